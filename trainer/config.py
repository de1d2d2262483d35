"""The trainer's own configuration: the optimisation loop (`TrainConfig`), the paths the
launcher resolved for this run (`RunInfo`), and `WorkerConfig`, the view of the resolved
job file (`RUN_DIR/config.json`) that a worker process reads.

Each component's config lives next to the component (model.py, span_corruption.py,
checkpoint.py, metrics.py); this module only composes them.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from trainer.checkpoint import CheckpointConfig
from trainer.metrics import MLflowConfig
from finetune.tasks import ChatTaskConfig, JGLUETaskConfig, LivedoorSFTTaskConfig, LivedoorTaskConfig
from trainer.causal_lm import CausalLMConfig
from trainer.model import ModelConfig
from trainer.seq2seq import Seq2SeqConfig
from trainer.span_corruption import SpanCorruptionConfig
from trainer.telemetry import TelemetryConfig

DEFAULT_OBJECTIVE = "span_corruption"


def _objective_name(value: Any) -> str | None:
    # `name` may be left out: every job file written before seq2seq existed means span corruption.
    if isinstance(value, dict):
        return value.get("name", DEFAULT_OBJECTIVE)
    return getattr(value, "name", None)


def _task_name(value: Any) -> str | None:
    return value.get("name") if isinstance(value, dict) else getattr(value, "name", None)


# One union per section, keyed by `name`: the YAML says which schema applies.
ObjectiveConfig = Annotated[
    Union[Annotated[SpanCorruptionConfig, Tag("span_corruption")], Annotated[Seq2SeqConfig, Tag("seq2seq")],
          Annotated[CausalLMConfig, Tag("causal_lm")]],
    Discriminator(_objective_name, custom_error_type="objective_name",
                  custom_error_message="name must be span_corruption (default), seq2seq or causal_lm"),
]
TaskConfig = Annotated[
    Union[Annotated[LivedoorTaskConfig, Tag("livedoor")], Annotated[JGLUETaskConfig, Tag("jglue")],
          Annotated[ChatTaskConfig, Tag("chat")], Annotated[LivedoorSFTTaskConfig, Tag("livedoor_sft")]],
    Discriminator(_task_name, custom_error_type="task_name",
                  custom_error_message="name is required: livedoor or jglue (seq2seq), chat or livedoor_sft "
                                       "(causal_lm)"),
]


DEFAULT_STEPS = 1000  # train.steps when neither it nor train.epochs is given


def describe_pydantic_error(error: dict) -> str:
    """What was wrong, for a person, of one of pydantic's `ValidationError.errors()` (the job
    file's problems, `t5ja eval`'s options)."""
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "required key is missing"
    return f"{error['msg']} (got {error.get('input')!r})"


class EvalConfig(BaseModel):
    """After the last step: seq2seq generates, scored by the task; causal_lm its loss. And `t5ja eval`'s defaults."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="evaluate after the last step (objectives seq2seq and causal_lm)")
    split: Literal["test", "validation"] = Field("test", description="the task split to evaluate on")
    batch_size: int = Field(32, gt=0, description="examples per generate() call (seq2seq, and `t5ja eval`'s "
                                                  "answers), windows per forward (causal_lm's loss)")
    max_new_tokens: int | None = Field(
        None, gt=0, description="tokens generated per example at most; default objective.target_length (seq2seq), "
                                "128 (`t5ja eval` of causal_lm)")


class TrainConfig(BaseModel):
    """Optimisation hyper-parameters. Batch sizes count sequences (packed windows).

    The run's length is `steps` optimizer steps, or `epochs` passes over the objective's
    training samples (span_corruption's packed windows, seq2seq's training examples,
    causal_lm's windows), like Hugging Face's `num_train_epochs`. Epochs become
    ceil(epochs x samples / global_batch_size) steps when training starts, once the data are
    built: rank 0 logs the count (`train.epochs 4 = 2,579 steps of 8 samples over 5,157
    samples`), MLflow's `train.steps` param holds it, and each checkpoint keeps it, so a
    resumed run ends at the same step even if its data changed since. Changing `epochs` (or
    `steps`) before resuming a run changes where it ends, from the checkpoint's step on.
    `--dry-run` cannot count the samples: it prints the epochs.
    """

    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(
        None, gt=0, description=f"optimizer steps to run; {DEFAULT_STEPS} when train.epochs is unset too (not both)")
    epochs: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="passes over the training samples instead of train.steps (fractions allowed): "
                    "ceil(epochs x samples / global_batch_size) steps, resolved when training starts")
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

    @field_validator("epochs")
    @classmethod
    def _not_with_steps(cls, epochs: float | None, info: ValidationInfo) -> float | None:
        # `steps` is validated first (field order); absent from info.data when it was invalid.
        steps = info.data.get("steps")
        if epochs is not None and steps is not None:
            raise ValueError(f"train.steps ({steps}) and train.epochs ({epochs:g}) are both set: give one of them "
                             "(to override a job file's one with the other on the command line, add "
                             "train.epochs=null or train.steps=null)")
        return epochs

    @model_validator(mode="after")
    def _default_length(self) -> TrainConfig:
        # The default lives here, not on the field: a `steps` the user wrote must be told
        # apart from the default to refuse it next to `epochs`.
        if self.steps is None and self.epochs is None:
            self.steps = DEFAULT_STEPS
        return self

    def describe_length(self) -> str:
        """The run's length as the launcher knows it (the sample count comes with the data)."""
        if self.epochs is None:
            return f"{self.steps:,} steps"
        return (f"{self.epochs:g} epochs (steps resolved at start: ceil({self.epochs:g} x training samples / "
                f"{self.global_batch_size}))")


def get_epoch_steps(epochs: float, num_samples: int, global_batch_size: int) -> int:
    """Optimizer steps of `epochs` passes over `num_samples`: ceil(epochs x num_samples / batch)."""
    if num_samples < 1:
        raise ValueError(f"train.epochs needs training samples, and the data hold {num_samples}")
    # Exact: the decimal the user wrote (0.1, not 0.1000000000000000055...), so 0.1 x 80 / 8 is 1 step, not 2.
    return math.ceil(Fraction(repr(epochs)) * num_samples / global_batch_size)


class RunInfo(BaseModel):
    """What the launcher derived for this run; never written by users."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(description="the run directory (absolute)")
    ds_config: str = Field(description="the filled DeepSpeed config this run uses")
    tokens_dir: str | None = Field(
        None, description="packed token shards written by data prep (span corruption; None for fine-tuning)")
    tokenizer_dir: str = Field(description="Hugging Face tokenizer directory: model.init_from's, else data prep's")
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
    objective: ObjectiveConfig = Field(default_factory=SpanCorruptionConfig)
    task: TaskConfig | None = None
    eval: EvalConfig = Field(default_factory=EvalConfig)
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
