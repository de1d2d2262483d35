"""The job file's `task:` section: which fine-tuning task a seq2seq run reads, as one union on
`name`, and what the trainer needs of any task: its splits and an evaluator that writes the report.

- `livedoor`: genre classification (finetune.livedoor); evaluation is scikit-learn's
  classification report + a confusion-matrix PNG.
- `jglue`: one JGLUE task (`task: jsquad | jnli | jsts | jcommonsenseqa`, finetune.jglue).
  JGLUE's test labels are not public: its `eval_file` (valid-v1.1.json) serves both the
  `validation` and the `test` evaluation split.

Token lengths are the objective's (`objective.input_length`, `objective.target_length`), not the
task's: one place says how long a sequence is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Literal, Union

from pydantic import Field

from finetune import Example, ReadReport
from finetune.jglue import JGLUEConfig, evaluate_task, read_task
from finetune.livedoor import LivedoorConfig, build_livedoor_task, evaluate_livedoor

EVAL_SPLITS = ("test", "validation")


class LivedoorTaskConfig(LivedoorConfig):
    """The livedoor news genre classification task (ldcc-20140209 tarball)."""

    name: Literal["livedoor"] = Field(description="task name; selects this task")


class JGLUETaskConfig(JGLUEConfig):
    """One JGLUE task from its v1.1 files; `eval_file` is both the validation and the test split."""

    name: Literal["jglue"] = Field(description="task name; selects this task")


TaskConfig = Annotated[Union[LivedoorTaskConfig, JGLUETaskConfig], Field(discriminator="name")]


@dataclass
class EvalResult:
    """What an evaluation produced: flat numeric metrics, the report's text, the files written."""

    metrics: dict[str, float]
    report: str
    files: list[Path] = field(default_factory=list)


# (examples, generated texts, output directory, file prefix) -> the result, files written
Evaluator = Callable[[list[Example], list[str], Path, str], EvalResult]


@dataclass
class TaskData:
    """A task's examples by split ("train", "validation", "test"), its read reports, its evaluator."""

    splits: dict[str, list[Example]]
    reports: list[ReadReport]
    evaluate: Evaluator

    def summary(self) -> str:
        sizes = ", ".join(f"{name} {len(examples)}" for name, examples in self.splits.items())
        return "\n".join([f"splits: {sizes}", *(report.summary() for report in self.reports)])


def get_task_path_problems(cfg: LivedoorTaskConfig | JGLUETaskConfig) -> list[tuple[str, str]]:
    """(yaml path, message) for each input file of the task that does not exist."""
    keys = ("path",) if isinstance(cfg, LivedoorTaskConfig) else ("train_file", "eval_file")
    return [(f"task.{key}", f"{getattr(cfg, key)}: no such file") for key in keys
            if not Path(getattr(cfg, key)).is_file()]


def load_task(cfg: LivedoorTaskConfig | JGLUETaskConfig) -> TaskData:
    """Read the task's files; deterministic, so every rank that calls it gets the same examples."""
    return _LOADERS[cfg.name](cfg)


def _load_livedoor(cfg: LivedoorTaskConfig) -> TaskData:
    task = build_livedoor_task(cfg)
    splits = {"train": task.splits["train"], "validation": task.splits["valid"], "test": task.splits["test"]}

    def evaluate(examples: list[Example], predictions: list[str], out_dir: Path, prefix: str) -> EvalResult:
        png = out_dir / f"{prefix}_confusion_matrix.png"
        result = evaluate_livedoor(examples, predictions, task.labels, png_path=png)
        report = out_dir / f"{prefix}_report.txt"
        report.write_text(result.text, encoding="utf-8")
        return EvalResult(get_classification_metrics(result.metrics), result.text, [report, png])

    return TaskData(splits, [task.corpus.report], evaluate)


def get_classification_metrics(report: dict) -> dict[str, float]:
    """scikit-learn's report dict -> flat MLflow-ready names (macro_f1, f1/<label>, ...)."""
    metrics = {"accuracy": report["accuracy"], "num_invalid": report.get("num_invalid", 0)}
    for average in ("macro avg", "weighted avg"):
        prefix = average.split()[0]
        for key in ("precision", "recall", "f1-score"):
            metrics[f"{prefix}_{key.split('-')[0]}"] = report[average][key]
    for label, values in report.items():
        if isinstance(values, dict) and label not in ("macro avg", "weighted avg") and not label.startswith("<"):
            metrics[f"f1/{label}"] = values["f1-score"]
    return metrics


def _load_jglue(cfg: JGLUETaskConfig) -> TaskData:
    read = read_task(cfg)
    (train, train_report), (held_out, eval_report) = read["train"], read["eval"]

    def evaluate(examples: list[Example], predictions: list[str], out_dir: Path, prefix: str) -> EvalResult:
        metrics = {k: float(v) for k, v in evaluate_task(cfg.task, examples, predictions).items()
                   if isinstance(v, (int, float))}
        text = json.dumps(metrics, indent=2) + "\n"
        report = out_dir / f"{prefix}_report.txt"
        report.write_text(f"{cfg.task} ({len(examples)} examples)\n{text}", encoding="utf-8")
        return EvalResult(metrics, text, [report])

    return TaskData({"train": train, "validation": held_out, "test": held_out}, [train_report, eval_report],
                    evaluate)


_LOADERS: dict[str, Callable[..., TaskData]] = {"livedoor": _load_livedoor, "jglue": _load_jglue}
