"""Process-group set-up and per-rank logging for workers started by torchrun."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
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


def init_distributed() -> None:
    """gloo on the CPU accelerator, NCCL on CUDA; env:// rendezvous set by torchrun."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    backend = "gloo" if get_accelerator().device_name() == "cpu" else "nccl"
    deepspeed.init_distributed(dist_backend=backend)
