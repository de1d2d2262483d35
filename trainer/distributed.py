"""Process-group set-up and per-rank logging for workers started by torchrun."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path


def get_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup_logging(run_dir: str) -> None:
    """Every rank logs to RUN_DIR/logs/rank_<R>.log; rank 0 also to stdout."""
    rank = get_rank()
    log_dir = Path(run_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(log_dir / f"rank_{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    logging.basicConfig(
        level=logging.INFO, handlers=handlers, force=True,
        format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s",
    )
    # ZeRO-3 on recent torch repeats a deprecation warning per gathered parameter.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def die_with_parent() -> None:
    """Linux: SIGKILL this worker when its parent (the torchrun agent) dies.

    torchrun starts each worker in a session of its own, so a killed agent (OOM killer, node
    agent, kill -9) would leave the ranks running as orphans, still writing checkpoints next
    to the job that replaces it.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the prctl: nobody will stop us
        os.kill(os.getpid(), signal.SIGKILL)


def get_restart_count() -> int:
    """How many times torchrun has restarted this job's workers (0 in the first round)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def import_deepspeed():
    """`import deepspeed`, without the MLflow import it does for its autotuner.

    deepspeed.runtime.config imports deepspeed.autotuning, whose module body tries `import
    mlflow` (for `deepspeed --autotuning` runs, which t5ja never starts): ~2.8 s of CPU in every
    worker at every start, on ranks that log nothing. The autotuner catches the ImportError;
    MLflow stays importable for our own logger afterwards. Also imports DeepSpeed's Muon
    optimizer without torch.compile (see _import_muon_uncompiled)."""
    if "deepspeed" not in sys.modules:
        hide = "mlflow" not in sys.modules
        if hide:
            sys.modules["mlflow"] = None  # `import mlflow` raises ImportError while this is set
        try:
            import deepspeed  # noqa: F401
        finally:
            if hide and sys.modules.get("mlflow", 0) is None:
                del sys.modules["mlflow"]
    _import_muon_uncompiled()
    return sys.modules["deepspeed"]


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def _import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer module with its Newton-Schulz kernels left eager.

    Every ZeRO optimizer (stage3.py's constructor, stage_1_and_2.py's first gradient reduction)
    imports deepspeed.runtime.zero.muon for an isinstance check against MuonWithAuxAdam. Its
    original_muon.py decorates three functions with `compiler.compile()`, i.e. torch.compile,
    which imports TorchInductor: ~3 s of CPU in every rank at every start. t5ja never trains
    with Muon (trainer/optim.py builds AdamW or DeepSpeedCPUAdam; launcher/ds_config.py refuses
    an `optimizer` section), so the module is imported once here while deepspeed's compile()
    returns its own no-op decorator (what it returns on a torch without torch.compile). Only
    for this import: compiler.compile is restored at once, and a DeepSpeed without the module
    or with another layout is left alone."""
    if MUON_MODULE in sys.modules:
        return
    from deepspeed.runtime import compiler

    real_compile, no_op = getattr(compiler, "compile", None), getattr(compiler, "dummy_decorator", None)
    if real_compile is None or no_op is None:
        return
    compiler.compile = lambda: no_op
    try:
        importlib.import_module(MUON_MODULE)
    except Exception:  # noqa: BLE001 - no Muon here, or it fails: DeepSpeed's own import decides later
        pass
    finally:
        compiler.compile = real_compile


def init_distributed() -> None:
    """gloo on the CPU accelerator, NCCL on CUDA; env:// rendezvous set by torchrun."""
    deepspeed = import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    backend = "gloo" if get_accelerator().device_name() == "cpu" else "nccl"
    if backend == "gloo":
        skip_shm_comm_op()
    prefix = get_store_prefix(os.environ)
    if prefix is not None:
        _init_process_group_with_prefix(backend, prefix)
    deepspeed.init_distributed(dist_backend=backend)  # adopts an initialised process group


def skip_shm_comm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op when it initialises,
    for its tensor-parallel inference layers only (`inference_all_reduce`); ZeRO training's
    collectives go through gloo. Marking the op unavailable spares every run loading it and a
    fresh machine its ~60 s compile. deepspeed.ops keeps the probed table in one dict that
    build_shm_op reads, and says edits to it persist."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def get_store_prefix(env: Mapping[str, str]) -> str | None:
    """A key prefix for this round's process group when torchrun restarted the workers on a
    store that outlives rounds; None when the store is fresh.

    torch >= 2.5 lets the workers share the agent's TCPStore (TORCHELASTIC_USE_AGENT_STORE),
    and the same store serves every restart round without a per-round prefix: the new ranks
    read the dead ranks' gloo/NCCL addresses and fail in connectFullMesh with "Connection
    refused" (pytorch/pytorch#135712). The launcher sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
    which gives each rendezvous round a fresh store; the prefix is for other torchrun lines.
    The restart count is exact on one node only (each agent counts its own restarts), so
    multi-node jobs need that variable.
    """
    restarts = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restarts == 0:
        return None
    return f"t5ja/restart_{restarts}/"


def _init_process_group_with_prefix(backend: str, prefix: str) -> None:
    import torch
    import torch.distributed as dist

    logging.getLogger("trainer").warning(
        "torchrun restart %d on the agent's shared store: process-group keys under %r "
        "(multi-node jobs: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)", get_restart_count(), prefix)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False)
    kwargs = {}
    if backend == "nccl":  # as DeepSpeed does: bind the device up front
        kwargs["device_id"] = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size,
                            **kwargs)


def ranks_flagging(flag: bool) -> list[int]:
    """Collective: the ranks on which `flag` is True, the same list on every rank.

    One all-reduce of a world-size vector of int32, on the accelerator so that NCCL can
    carry it. Reading the result waits for the device: a sync point, for step boundaries.
    """
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=get_accelerator().current_device_name())
    flags[dist.get_rank()] = int(flag)
    dist.all_reduce(flags)
    return flags.nonzero().flatten().tolist()


def get_shard(num_items: int) -> range:
    """This rank's items of a split evaluated by every rank: rank, rank + world_size, ... (so
    a sorted split's long and short examples spread evenly). Rank 0 alone without a process group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return range(num_items)
    return range(dist.get_rank(), num_items, dist.get_world_size())


def gather_shards(items: list) -> list | None:
    """Collective: every rank's `get_shard` results, back in the split's order, on rank 0
    (None on the others). Pickled Python objects: prediction records, not tensors."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return items
    world_size = dist.get_world_size()
    shards = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(items, shards, dst=0)
    if shards is None:
        return None
    merged = [None] * sum(len(shard) for shard in shards)
    for rank, shard in enumerate(shards):
        merged[rank::world_size] = shard
    return merged
