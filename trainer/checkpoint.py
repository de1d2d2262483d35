"""DeepSpeed checkpoints of the run, the `TrainState` inside them, and Hugging Face export.

Layout: RUN_DIR/checkpoints/step_00000100/ holds DeepSpeed's files for that step plus a copy
of the resolved job (`config.json`); RUN_DIR/checkpoints/latest names the newest tag.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field


class CheckpointConfig(BaseModel):
    """When to save and how many to keep."""

    model_config = ConfigDict(extra="forbid")

    every_steps: int = Field(1000, ge=0, description="save every this many optimizer steps (0: only at the end)")
    keep_last: int = Field(2, ge=1, description="how many of the newest checkpoints to keep")
    resume: bool = Field(True, description="continue from RUN_DIR/checkpoints/latest when it exists")


@dataclass
class TrainState:
    """Runtime state that is checkpointed; never part of the config."""

    step: int = 0  # optimizer steps completed
    consumed_samples: int = 0  # sequences consumed, all ranks together
    consumed_tokens: int = 0  # packed-window tokens consumed, all ranks together
    restarts: list[int] = field(default_factory=list)  # steps at which the job was resumed


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def get_latest_tag(run_dir: Path) -> str | None:
    latest = checkpoints_dir(run_dir) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def save_checkpoint(engine, run_dir: Path, state: TrainState, resolved_config: Path, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the tag."""
    tag = tag_for(state.step)
    engine.save_checkpoint(str(checkpoints_dir(run_dir)), tag=tag, client_state={"train_state": asdict(state)})
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.copy2(resolved_config, checkpoints_dir(run_dir) / tag / "config.json")
        _prune(checkpoints_dir(run_dir), keep_last)
    dist.barrier()
    return tag


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    tags = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    for old in tags[:-keep_last]:
        shutil.rmtree(old)


def load_latest(engine, run_dir: Path) -> TrainState | None:
    """Collective. Loads RUN_DIR/checkpoints/latest into the engine; None when there is none."""
    tag = get_latest_tag(run_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(checkpoints_dir(run_dir)), tag=tag)
    if path is None:
        # DeepSpeed returns None instead of raising when files are missing: a checkpoint
        # that the run directory names must not be silently replaced by a fresh start.
        raise RuntimeError(f"{checkpoints_dir(run_dir) / tag}: named by 'latest' but could not be loaded")
    return TrainState(**client_state["train_state"])


def consolidated_state_dict(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 master weights of a ZeRO-1/2/3 checkpoint, gathered on the CPU of this process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints_dir(run_dir)), tag=tag)


# What a Hugging Face tokenizer directory holds (data prep's markers and manifest stay behind).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")


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


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
