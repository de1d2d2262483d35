"""Atomic DeepSpeed checkpoints of the run, the `TrainState` inside them, and Hugging Face export.

Layout:
    RUN_DIR/checkpoints/step_00000100/   DeepSpeed's files for that step, plus
        config.json                       a copy of the resolved job
        train_state.json                  TrainState (rank 0)
        rng_rank<R>.pt                    each rank's RNG states
        manifest.json                     every file's size and sha256, and the writer's topology
                                          (world size, data-parallel size, ZeRO stage); written last
        universal/                        added on the first resume on another number of ranks:
                                          DeepSpeed's universal form of the step (trainer/universal.py),
                                          with a manifest of its own
    RUN_DIR/checkpoints/latest            the newest complete tag

A checkpoint becomes visible only when complete on every rank: all ranks write into
`step_N.staging`, barrier, then rank 0 writes the manifest, renames the directory to `step_N`
and moves `latest` (write temp, fsync, rename). DeepSpeed's own `latest` is not used: it is
written before DeepSpeed's final barrier and not atomically. A crash at any point leaves the
previous checkpoint as `latest`.

Resuming on another data-parallel size (or ZeRO stage) than the checkpoint's loads its
universal form, converted once by rank 0 into `universal.staging` and renamed into place
(`t5ja checkpoint convert` does the same ahead of time). Batches do not depend on the world
size (trainer/data.py), so only the engine state needs re-partitioning; see docs/world_size.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from trainer import universal

# torch is imported inside the functions that run on the workers: the launcher reads this
# module's config and checkpoint files on every command, and importing torch costs it 2+ s.

log = logging.getLogger("trainer.checkpoint")

STAGING_SUFFIX = ".staging"
MANIFEST = "manifest.json"
UNIVERSAL = "universal"  # the subdirectory of a step that holds its universal form


class CheckpointConfig(BaseModel):
    """When to save, how many to keep, how to check them on load."""

    model_config = ConfigDict(extra="forbid")

    every_steps: int = Field(1000, ge=0, description="save every this many optimizer steps (0: only at the end)")
    keep_last: int = Field(2, ge=1, description="how many of the newest checkpoints to keep")
    keep_every: int = Field(0, ge=0, description="also keep checkpoints whose step is a multiple of this (0: none)")
    resume: bool = Field(True, description="continue from RUN_DIR/checkpoints/latest when it exists")
    verify: Literal["sha256", "size"] = Field("sha256", description="how a checkpoint is checked before loading: sha256 of every file, or sizes only")


@dataclass
class TrainState:
    """Runtime state that is checkpointed; never part of the config."""

    step: int = 0  # optimizer steps completed
    consumed_samples: int = 0  # sequences consumed, all ranks together
    consumed_tokens: int = 0  # packed-window tokens consumed, all ranks together
    restarts: list[int] = field(default_factory=list)  # steps at which the job was resumed
    mlflow_run_id: str | None = None  # the job's MLflow run (also in RUN_DIR/mlflow_run_id)
    nonfinite_skips: int = 0  # steps whose update was skipped for a NaN/inf loss (train.nonfinite_loss=skip)
    # resumes on another number of data-parallel ranks: {"step", "from_world_size", "to_world_size"}
    world_size_changes: list[dict] = field(default_factory=list)
    # The step the run ends at (train.steps, or train.epochs resolved over the data; 0 in older
    # checkpoints), and the train.epochs it was resolved from (None: train.steps). Kept so that a
    # resumed run ends where it was going to, even if its data changed since.
    num_steps: int = 0
    epochs: float | None = None


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def get_latest_tag(run_dir: Path) -> str | None:
    latest = checkpoints_dir(run_dir) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def list_complete_tags(run_dir: Path) -> list[str]:
    """Tags with a manifest, oldest first (staging directories are never complete)."""
    tags = [p.name for p in checkpoints_dir(run_dir).glob("step_*")
            if p.is_dir() and not p.name.endswith(STAGING_SUFFIX) and (p / MANIFEST).is_file()]
    return sorted(tags)


# ---- saving -----------------------------------------------------------------------------

def get_rng_state() -> dict:
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(engine, run_dir: Path, state: TrainState, resolved_config: Path, cfg: CheckpointConfig,
                    before_commit: Callable[[], None] | None = None) -> str:
    """Collective: every rank calls it. Returns the tag once it is complete and `latest`.
    `before_commit` runs on every rank once its own files are written (a testing hook)."""
    import torch
    import torch.distributed as dist

    tag = tag_for(state.step)
    ckpt_dir = checkpoints_dir(run_dir)
    staging = ckpt_dir / (tag + STAGING_SUFFIX)
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that crashed
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=staging.name, save_latest=False)
    torch.save(get_rng_state(), staging / f"rng_rank{dist.get_rank()}.pt")
    if before_commit is not None:
        before_commit()
    dist.barrier()  # every rank's files are written
    if dist.get_rank() == 0:
        _write_json(staging / "train_state.json", asdict(state))
        shutil.copy2(resolved_config, staging / "config.json")
        publish(staging, ckpt_dir / tag, topology=universal.get_topology(engine))
        prune(ckpt_dir, cfg)
    dist.barrier()
    return tag


def publish(staging: Path, final: Path, topology: dict | None = None) -> None:
    """Manifest, then rename, then `latest`: each step durable before the next."""
    write_manifest(staging, topology)
    if final.exists():  # a complete checkpoint of the same step (a rerun of it): replaced
        shutil.rmtree(final)
    staging.rename(final)
    _fsync_dir(final.parent)
    write_atomic(final.parent / "latest", final.name + "\n")


def write_manifest(staging: Path, topology: dict | None = None) -> None:
    """Every file's size and sha256 (plus the writer's topology), then fsync all of it."""
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    manifest = {"files": [{"path": str(p.relative_to(staging)), "bytes": p.stat().st_size, "sha256": _sha256(p)}
                          for p in files]}
    if topology is not None:
        manifest["topology"] = topology
    _write_json(staging / MANIFEST, manifest)
    _fsync_tree(staging)


def prune(ckpt_dir: Path, cfg: CheckpointConfig) -> None:
    tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(STAGING_SUFFIX))
    keep = set(tags[-cfg.keep_last:])
    if cfg.keep_every:
        keep |= {t for t in tags if int(t.split("_")[1]) % cfg.keep_every == 0}
    for tag in tags:
        if tag not in keep:
            shutil.rmtree(ckpt_dir / tag)


# ---- loading ------------------------------------------------------------------------------

def get_checkpoint_problems(path: Path, verify: str) -> list[str]:
    """Why the checkpoint at `path` cannot be trusted; empty when it matches its manifest."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return [f"{path}: no {MANIFEST} (incomplete save)"]
    problems = []
    for entry in json.loads(manifest_path.read_text())["files"]:
        file = path / entry["path"]
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif file.stat().st_size != entry["bytes"]:
            problems.append(f"{file}: {file.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif verify == "sha256" and _sha256(file) != entry["sha256"]:
            problems.append(f"{file}: sha256 differs from the manifest")
    return problems


def choose_resume_tag(run_dir: Path, verify: str) -> str | None:
    """The newest checkpoint that verifies, starting from `latest`; None for a fresh run.

    `latest` naming a checkpoint that does not exist is an error, not a fresh start: the run
    directory says training happened, and silently starting over would lose it.
    """
    latest = get_latest_tag(run_dir)
    if latest is None:
        return None
    if not (checkpoints_dir(run_dir) / latest).is_dir():
        raise FileNotFoundError(f"{checkpoints_dir(run_dir) / 'latest'} names {latest}, which does not exist; "
                                "restore it, or set checkpoint.resume=false to start over")
    candidates = [t for t in reversed(list_complete_tags(run_dir)) if t <= latest]
    for tag in candidates if latest in candidates else [latest] + candidates:
        problems = get_checkpoint_problems(checkpoints_dir(run_dir) / tag, verify)
        if not problems:
            return tag
        log.error("checkpoint %s is unusable, trying the previous one:\n  %s", tag, "\n  ".join(problems))
    raise RuntimeError(f"{checkpoints_dir(run_dir)}: no usable checkpoint (latest was {latest}); "
                       "set checkpoint.resume=false to start over")


def load_checkpoint(engine, run_dir: Path, tag: str, verify: str = "sha256") -> TrainState:
    """Collective. Loads `tag` into the engine and this rank's RNG; returns the TrainState.

    A checkpoint of another data-parallel size or ZeRO stage is loaded through its universal
    form (converted here by rank 0 if needed; `verify` checks an existing one).
    """
    path = checkpoints_dir(run_dir) / tag
    state = read_train_state(path)
    saved, current = get_saved_topology(path), universal.get_topology(engine)
    reason = universal.get_resize_reason(saved, current)
    if reason is None:
        loaded, _ = engine.load_checkpoint(str(checkpoints_dir(run_dir)), tag=tag)
        if loaded is None:
            raise RuntimeError(f"{path}: DeepSpeed could not load it")
    else:
        # The batches of step k are samples [k*G, (k+1)*G) on any world size (trainer/data.py).
        log.warning("checkpoint %s was %s: loading its universal form (weights and the whole optimizer "
                    "state, re-partitioned; LR schedule as saved); the data continue at global sample %d "
                    "(step %d); see docs/world_size.md", tag, reason, state.consumed_samples, state.step)
        universal.load(engine, ensure_universal_all_ranks(path, verify))
        if saved["dp_world_size"] != current["dp_world_size"]:
            state.world_size_changes.append({"step": state.step, "from_world_size": saved["dp_world_size"],
                                             "to_world_size": current["dp_world_size"]})
    load_rng_state(path, state.step)
    return state


def read_train_state(path: Path) -> TrainState:
    """The TrainState of the checkpoint at `path` (no engine needed)."""
    return TrainState(**json.loads((path / "train_state.json").read_text()))


def read_latest_train_state(run_dir: Path) -> TrainState | None:
    """The TrainState of the run's newest checkpoint, None while it has none."""
    tag = get_latest_tag(run_dir)
    path = checkpoints_dir(run_dir) / tag if tag else None
    if path is None or not (path / "train_state.json").is_file():
        return None
    return read_train_state(path)


def load_rng_state(path: Path, step: int) -> None:
    """This rank's saved RNG states; a rank that has none (resuming on more ranks than saved)
    is seeded from (train.seed, step, rank) instead. Data are unaffected either way: the
    sample order and span-corruption masks are seeded per sample (trainer/data.py); the RNG
    streams drive only dropout."""
    import torch
    import torch.distributed as dist

    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
        return
    train_seed = json.loads((path / "config.json").read_text())["train"]["seed"]
    seed = universal.fallback_rng_seed(train_seed, step, dist.get_rank())
    log.warning("%s: no RNG state for rank %d (saved by fewer ranks); seeding it with %d, from "
                "(train.seed=%d, step=%d, rank=%d)", path.name, dist.get_rank(), seed, train_seed, step,
                dist.get_rank())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_saved_topology(path: Path) -> dict:
    """The world size, data-parallel size and ZeRO stage that wrote the checkpoint at `path`."""
    manifest = json.loads((path / MANIFEST).read_text())
    return manifest.get("topology") or universal.infer_topology(path)


def ensure_universal(path: Path, verify: str, num_workers: int = 1) -> Path:
    """The universal form of the checkpoint at `path`, converted unless a verified one exists.

    Atomic like a save: written into `universal.staging`, manifest, rename; a crash leaves no
    half conversion visible, and a later call starts it again.
    """
    final = path / UNIVERSAL
    if final.is_dir():
        problems = get_checkpoint_problems(final, verify)
        if not problems:
            return final
        log.error("%s is unusable, converting again:\n  %s", final, "\n  ".join(problems))
        shutil.rmtree(final)
    staging = path / (UNIVERSAL + STAGING_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)  # left by a conversion that crashed
    start = time.perf_counter()
    universal.convert(path, staging, num_workers)
    write_manifest(staging)
    staging.rename(final)
    _fsync_dir(path)
    log.info("converted %s to a universal checkpoint in %.1f s", path.name, time.perf_counter() - start)
    return final


def ensure_universal_all_ranks(path: Path, verify: str) -> Path:
    """Collective: rank 0 converts while the others wait; a failure is raised on every rank."""
    import torch.distributed as dist

    outcome: list = [None]
    if dist.get_rank() == 0:
        try:
            ensure_universal(path, verify)
        except Exception as err:  # noqa: BLE001 - reported on every rank below
            log.exception("universal conversion of %s failed", path)
            outcome[0] = f"{type(err).__name__}: {err}"
    dist.broadcast_object_list(outcome, src=0)  # also the barrier: the others wait for rank 0 here
    if outcome[0] is not None:
        raise RuntimeError(f"{path}: cannot convert it to a universal checkpoint ({outcome[0]}); resume on "
                           "the world size that wrote it, or see docs/world_size.md")
    return path / UNIVERSAL


def resume_tag_all_ranks(run_dir: Path, verify: str) -> str | None:
    """Rank 0 chooses (and verifies) the tag; every rank gets the same answer."""
    import torch.distributed as dist

    choice = [choose_resume_tag(run_dir, verify) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


# ---- export -------------------------------------------------------------------------------

# What a Hugging Face tokenizer directory holds (data prep's markers and manifest stay behind).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")


def consolidated_state_dict(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 master weights of a ZeRO-1/2/3 checkpoint, gathered on the CPU of this process."""
    from trainer.distributed import import_deepspeed

    import_deepspeed()  # `t5ja export` in a fresh process: without the autotuner's MLflow import
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints_dir(run_dir)), tag=tag)


def export_hf(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], tokenizer_dir: Path, out_dir: Path) -> None:
    """Write a `save_pretrained` directory (safetensors) plus the tokenizer files."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # Tied weights (T5's shared embedding / lm_head) are stored once in the checkpoint.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out_dir / name)


# ---- files --------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
