"""The job file: one YAML per job, one section per concern.

Each section's schema lives next to the code that reads it (data_prep.config, trainer.*);
this module composes them and adds the launcher's own sections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from data_prep.config import DataConfig, TokenizerConfig
from launcher.slurm import SlurmConfig
from trainer.checkpoint import CheckpointConfig
from trainer.config import EvalConfig, ObjectiveConfig, TaskConfig, TrainConfig
from trainer.metrics import MLflowConfig
from trainer.model import ModelConfig
from trainer.span_corruption import SpanCorruptionConfig
from trainer.telemetry import TelemetryConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class LauncherConfig(BaseModel):
    """How the job's processes are started."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "slurm"] = Field(
        "local", description="local: torchrun on this machine; slurm: render slurm/*.sbatch and submit it (docs/slurm.md)")
    nnodes: int = Field(1, ge=1, description="number of nodes (the local backend runs one)")
    nproc_per_node: int = Field(1, ge=1, description="training processes per node (one per GPU)")
    max_restarts: int = Field(
        0, ge=0, description="torchrun --max-restarts: times all workers are restarted after one fails; "
                             "they resume from checkpoints/latest (docs/resilience.md)"
    )
    shutdown_timeout_s: int = Field(
        120, ge=1, description="on SIGTERM/SIGUSR1, seconds torchrun gives workers to checkpoint before SIGKILL"
    )
    master_port: int | None = Field(
        None, ge=1, le=65535,
        description="rendezvous port of the local backend (torchrun --rdzv-endpoint 127.0.0.1:PORT); "
                    "default: --standalone picks a free one"
    )
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="Slurm settings (launcher.backend=slurm)")


class DeepSpeedSection(BaseModel):
    """Which DeepSpeed settings file to use; its ZeRO knobs stay in that file."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field("zero2", description="a name in ds_configs/ (zero1, zero2, zero3, zero3_offload) or a path")


class JobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="job name: run directory and MLflow run name")
    output_dir: str = Field("runs", description="root of run directories; the run directory is output_dir/name")
    data: DataConfig | None = Field(
        None, description="corpora and data-prep outputs; required by objective span_corruption (seq2seq and "
                          "causal_lm read their task instead)")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="SentencePiece tokenizer")
    model: ModelConfig = Field(default_factory=ModelConfig, description="model preset and overrides")
    objective: ObjectiveConfig = Field(
        default_factory=SpanCorruptionConfig,
        description="training objective, by `name`: span_corruption (default), seq2seq or causal_lm (both need "
                    "`task`)")
    task: TaskConfig | None = Field(
        None, description="the fine-tuning task, by `name`: livedoor or jglue (objective seq2seq), chat or "
                          "livedoor_sft (objective causal_lm)")
    eval: EvalConfig = Field(default_factory=EvalConfig,
                             description="evaluation after the last step (seq2seq, causal_lm)")
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimisation")
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection, description="DeepSpeed settings file")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="checkpointing")
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig, description="experiment tracking")
    telemetry: TelemetryConfig = Field(
        default_factory=TelemetryConfig, description="system metrics of every node (network, disk, CPU, memory, GPU)"
    )
    launcher: LauncherConfig = Field(default_factory=LauncherConfig, description="process launch")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def world_size(self) -> int:
        return self.launcher.nnodes * self.launcher.nproc_per_node

    @property
    def pack_length(self) -> int | None:
        """Tokens per packed window: set in data, else what the objective needs (None: no packing)."""
        return self.data.pack_length or getattr(self.objective, "expanded_length", None)

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{Path(self.output_dir) / 'mlflow.db'}"
