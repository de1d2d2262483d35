"""The trainer's own configuration: the optimisation loop (`TrainConfig`), the paths the
launcher resolved for this run (`RunInfo`), and `WorkerConfig`, the view of the resolved
job file (`RUN_DIR/config.json`) that a worker process reads.

Each component's config lives next to the component (model.py, span_corruption.py,
checkpoint.py, metrics.py); this module only composes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from trainer.checkpoint import CheckpointConfig
from trainer.metrics import MLflowConfig
from trainer.model import ModelConfig
from trainer.span_corruption import SpanCorruptionConfig
from trainer.telemetry import TelemetryConfig


class TrainConfig(BaseModel):
    """Optimisation hyper-parameters. Batch sizes count sequences (packed windows)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, gt=0, description="optimizer steps to run")
    global_batch_size: int = Field(128, gt=0, description="sequences per optimizer step, all ranks together")
    micro_batch_size: int = Field(8, gt=0, description="sequences per forward/backward on one rank")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 to lr over this many steps")
    lr_decay: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="decay shape after warm-up, down to lr * min_lr_ratio at the last step"
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of lr")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2)")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0 disables)")
    precision: Literal["bf16", "fp32", "fp16"] = Field(
        "bf16", description="training precision; fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator lacks it)"
    )
    seed: int = Field(42, description="seeds model init, data order and span-corruption masks")
    log_every: int = Field(10, gt=0, description="log metrics every this many optimizer steps")
    nonfinite_loss: Literal["stop", "skip"] = Field(
        "stop", description="a step whose loss is NaN/inf on any rank: stop there (exit code 3, that step not "
                            "saved, `latest` stays the checkpoint before it) or skip its update on every rank (its "
                            "batch is not retried); see docs/resilience.md"
    )
    max_nonfinite_skips: int = Field(
        20, ge=0, description="with nonfinite_loss=skip: steps the run may skip in all; the next non-finite step stops"
    )


class RunInfo(BaseModel):
    """What the launcher derived for this run; never written by users."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(description="the run directory (absolute)")
    ds_config: str = Field(description="the filled DeepSpeed config this run uses")
    tokens_dir: str = Field(description="packed token shards written by data prep")
    tokenizer_dir: str = Field(description="Hugging Face tokenizer directory written by data prep")
    world_size: int = Field(description="number of training processes")
    gradient_accumulation_steps: int = Field(description="micro-steps per optimizer step")
    tracking_uri: str = Field(description="resolved MLflow tracking URI")
    job_name: str = Field(description="the job's name (MLflow run name)")


class WorkerConfig(BaseModel):
    """The sections of the resolved job file that a training worker reads."""

    # The launcher validated the whole job; sections owned by data prep and the launcher
    # (data, tokenizer, deepspeed, launcher) are not the worker's business.
    model_config = ConfigDict(extra="ignore")

    run: RunInfo
    model: ModelConfig
    objective: SpanCorruptionConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    mlflow: MLflowConfig
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    raw: dict = Field(default_factory=dict, exclude=True, description="the whole resolved job, for logging")


def load_worker_config(path: str | Path) -> WorkerConfig:
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    cfg = WorkerConfig.model_validate(raw)
    cfg.raw = raw
    return cfg
