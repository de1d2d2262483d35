"""DeepSpeed settings: find the ds_configs/ file, check it, fill what the job derives.

The files own every ZeRO knob. The launcher fills only the fields it derives from the job
(batch sizes, gradient accumulation, clipping, precision); in the files those read "auto",
as in the Hugging Face Trainer's DeepSpeed integration. A concrete value there that
disagrees with the job is an error, not a silent override.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from trainer.config import TrainConfig

DS_CONFIGS_DIR = Path(__file__).resolve().parents[1] / "ds_configs"


@dataclass(frozen=True)
class BatchSizes:
    """Batch arithmetic, computed once: global = micro x accumulation x data-parallel size."""

    global_batch_size: int
    micro_batch_size: int
    world_size: int

    @property
    def divisible(self) -> bool:
        return self.global_batch_size % (self.micro_batch_size * self.world_size) == 0

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.world_size)


def resolve_ds_config_path(name_or_path: str) -> Path:
    """`zero2`, `zero2.json` or a path; bare names are looked up in ds_configs/."""
    path = Path(name_or_path)
    if path.suffix != ".json" and not path.exists():
        path = path.with_suffix(".json")
    if not path.is_absolute() and not path.exists() and len(path.parts) == 1:
        path = DS_CONFIGS_DIR / path.name
    return path


def read_ds_config(path: Path) -> tuple[dict | None, list[tuple[str, str]]]:
    where = "deepspeed.config"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in DS_CONFIGS_DIR.glob("*.json")))
        return None, [(where, f"{path}: no such file (names in ds_configs/: {known})")]
    try:
        return json.loads(path.read_text(encoding="utf-8")), []
    except json.JSONDecodeError as err:
        return None, [(where, f"{path}: not valid JSON: {err}")]


def _filled_values(train: TrainConfig, batch: BatchSizes) -> dict[str, object]:
    return {
        "train_batch_size": batch.global_batch_size,
        "train_micro_batch_size_per_gpu": batch.micro_batch_size,
        "gradient_accumulation_steps": batch.gradient_accumulation_steps,
        "gradient_clipping": train.grad_clip,
        "bf16.enabled": train.precision == "bf16",
        "fp16.enabled": train.precision == "fp16",
    }


def _get(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def get_ds_config_problems(ds: dict, path: Path, train: TrainConfig, batch: BatchSizes) -> list[tuple[str, str]]:
    problems = []
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage is {stage!r}; expected 0, 1, 2 or 3")
    if _get(zero, "offload_param.device") not in (None, "none") and stage != 3:
        problems.append(f"offload_param needs ZeRO stage 3, but stage is {stage}")
    if _get(zero, "offload_optimizer.device") not in (None, "none") and stage == 0:
        problems.append("offload_optimizer needs ZeRO stage 1, 2 or 3, but stage is 0")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            problems.append(f"'{section}' is set here; the optimizer and LR schedule come from the job's train.*")
    for key, value in _filled_values(train, batch).items():
        current = _get(ds, key)
        if current not in (None, "auto") and current != value:
            problems.append(f"{key} is {current!r} but the job derives {value!r}; write \"auto\" there")
    return [("deepspeed.config", f"{path}: {p}") for p in problems]


def fill_ds_config(ds: dict, train: TrainConfig, batch: BatchSizes) -> dict:
    filled = copy.deepcopy(ds)
    for key, value in _filled_values(train, batch).items():
        _set(filled, key, value)
    return filled
