"""Resuming on another number of ranks: DeepSpeed's universal checkpoints.

A ZeRO checkpoint holds one optimizer partition per data-parallel rank, so DeepSpeed's
ordinary load needs the same data-parallel size (and ZeRO stage) as the save. DeepSpeed's
`ds_to_universal` rewrites a checkpoint as one file per parameter and state (fp32 master
weight, Adam exp_avg, exp_avg_sq, step) under `zero/<param name>/`, which an engine of any
data-parallel size re-partitions on load (`"checkpoint": {"load_universal": true}`). It
works for ZeRO-1/2 and ZeRO-3 in DeepSpeed 0.19.8, on CPU too; the optimizer state is
carried over in full.

This module is the thin adapter around DeepSpeed: what a checkpoint's topology is, the
conversion call, and the universal load. Where the converted directory lives and how it is
published atomically is `trainer/checkpoint.py`'s business.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("trainer.universal")


def get_topology(engine) -> dict:
    """How the engine's state is partitioned: what a checkpoint records about its writer."""
    import deepspeed
    import torch.distributed as dist

    return {"world_size": dist.get_world_size(), "dp_world_size": engine.dp_world_size,
            "zero_stage": int(engine.zero_optimization_stage()), "deepspeed": deepspeed.__version__}


def infer_topology(ckpt_path: Path) -> dict:
    """The topology of a checkpoint whose manifest does not record it (older saves), from its
    file names: one optimizer partition per data-parallel rank, one RNG file per rank, and
    per-rank model states only under ZeRO-3. Stage 1 and 2 files look alike: None."""
    num_partitions = len(list(ckpt_path.glob("*optim_states.pt")))
    zero3 = any(ckpt_path.glob("zero_pp_rank_*_mp_rank_*_model_states.pt"))
    return {"world_size": len(list(ckpt_path.glob("rng_rank*.pt"))), "dp_world_size": num_partitions,
            "zero_stage": 3 if zero3 else None}


def get_resize_reason(saved: dict, current: dict) -> str | None:
    """Why DeepSpeed's ordinary load cannot take this checkpoint; None when it can."""
    if saved["dp_world_size"] != current["dp_world_size"]:
        return (f"saved with data-parallel size {saved['dp_world_size']}, resuming with "
                f"{current['dp_world_size']}")
    if saved.get("zero_stage") is not None and saved["zero_stage"] != current["zero_stage"]:
        return f"saved under ZeRO-{saved['zero_stage']}, resuming under ZeRO-{current['zero_stage']}"
    return None


def convert(ckpt_path: Path, out_path: Path, num_workers: int = 1) -> None:
    """Write the universal form of the DeepSpeed checkpoint `ckpt_path` into `out_path`.

    One process; `num_workers` > 1 forks extraction workers (not inside a training worker:
    forking a process with a live process group is asking for trouble).
    """
    from trainer.distributed import import_deepspeed

    import_deepspeed()
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=str(ckpt_path), output_folder=str(out_path), num_extract_workers=num_workers,
        num_merge_workers=num_workers, keep_temp_folder=False, strict=True,
        # Our model is not Megatron's: it declares no tensor/pipeline-parallel layout, which
        # DeepSpeed reads from `universal_checkpoint_info` (only a client of its own can set
        # it; it is reserved in client_state). Plain data parallelism needs only the version.
        inject_missing_state=True,
    )
    progress = io.StringIO()
    # Its step-by-step prints go into our log; its tqdm bars (stderr) nowhere.
    with contextlib.redirect_stdout(progress), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal(args)
    log.info("ds_to_universal %s -> %s:\n%s", ckpt_path, out_path, progress.getvalue().rstrip())
    # It also writes `latest_universal` next to its output; we never load by DeepSpeed's
    # `latest` files, and this one would name a staging directory.
    (out_path.parent / "latest_universal").unlink(missing_ok=True)


def load(engine, universal_path: Path) -> None:
    """Collective. Load a universal checkpoint into the engine: weights, optimizer state
    re-partitioned for this data-parallel size, LR scheduler, DeepSpeed's step counters."""
    # `load_universal` is read only by load_checkpoint (DeepSpeed 0.19.8: engine.py), so it
    # is switched on for this call instead of in ds_config.json, where it would make every
    # later same-topology resume take the universal path too.
    config = engine._config
    previous, config.load_universal_checkpoint = config.load_universal_checkpoint, True
    try:
        loaded, _ = engine.load_checkpoint(str(universal_path.parent), tag=universal_path.name)
    finally:
        config.load_universal_checkpoint = previous
    if loaded is None:
        raise RuntimeError(f"{universal_path}: DeepSpeed could not load this universal checkpoint")
    if engine.zero_optimization_stage() == 3:
        repair_zero3_optimizer(engine.optimizer, universal_path)


def repair_zero3_optimizer(zero3_optimizer, universal_path: Path) -> None:
    """Undo two faults of DeepSpeed 0.19.8's ZeRO-3 universal load
    (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3):

    - every sub-group gets the *same* `step` tensor, which torch's Adam increments in place
      once per sub-group: from the first step on, the groups' bias corrections are wrong
      (measured on t5-tiny: the loss drifts 3.5e-3 from the uninterrupted run within 10
      steps; repaired, a universal resume on the same ranks matches it bit for bit). Each
      sub-group gets its own copy.
    - param group 0's hyper-parameters are copied into every group, so the no-decay group
      (biases, norms) would be decayed. Each group gets its saved values back.
    """
    import torch

    base = zero3_optimizer.optimizer
    for flat in zero3_optimizer.fp32_partitioned_groups_flat:
        state = base.state.get(flat)
        if state is not None and torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    saved = torch.load(universal_path / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    if len(saved_groups) != len(base.param_groups):
        raise RuntimeError(f"{universal_path}: {len(saved_groups)} optimizer param groups saved, "
                           f"{len(base.param_groups)} now")
    for group, saved_group in zip(base.param_groups, saved_groups):
        group.update({key: value for key, value in saved_group.items() if key != "params"})


def fallback_rng_seed(train_seed: int, step: int, rank: int) -> int:
    """The seed of a rank that resumes without an RNG file of its own (more ranks than
    saved): a pure function of (train.seed, step, rank), so reruns agree."""
    return int(np.random.SeedSequence([train_seed, step, rank]).generate_state(1)[0])
