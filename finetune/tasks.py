"""The job file's `task:` section: which fine-tuning task a run reads, as one union on `name`,
and what the trainer needs of any task: its splits (and, for seq2seq, an evaluator that writes
the report). Each objective reads its own kind of task (OBJECTIVE_TASKS):

seq2seq (text-to-text Examples, scored by generation):
- `livedoor`: genre classification (finetune.livedoor); evaluation is scikit-learn's
  classification report + a confusion-matrix PNG.
- `jglue`: one JGLUE task (`task: jsquad | jnli | jsts | jcommonsenseqa`, finetune.jglue).
  JGLUE's test labels are not public: its `eval_file` (valid-v1.1.json) serves both the
  `validation` and the `test` evaluation split.

causal_lm (conversations in Gemma's turn format, finetune.chat; scored by the eval split's loss):
- `chat`: chat JSON lines; the optional `eval_file` serves both evaluation splits.
- `livedoor_sft`: article -> title and article -> genre name, built from the livedoor tarball's
  split (train for training, valid / test for the evaluation splits: no title or genre of an
  evaluation article is trained on).

Token lengths are the objective's (`objective.input_length`, `objective.max_length`, ...), not
the task's: one place says how long a sequence is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune import Example, ReadReport
from finetune.chat import LivedoorSFTConfig, Message, build_livedoor_sft, read_chat_jsonl
from finetune.jglue import TASKS, JGLUEConfig, evaluate_task, read_task
from finetune.livedoor import (LivedoorConfig, LivedoorSplitConfig, build_livedoor_task, evaluate_livedoor,
                               parse_predictions, read_livedoor, split_articles)

EVAL_SPLITS = ("test", "validation")


class LivedoorTaskConfig(LivedoorConfig):
    """The livedoor news genre classification task (ldcc-20140209 tarball)."""

    name: Literal["livedoor"] = Field(description="task name; selects this task")


class JGLUETaskConfig(JGLUEConfig):
    """One JGLUE task from its v1.1 files; `eval_file` is both the validation and the test split."""

    name: Literal["jglue"] = Field(description="task name; selects this task")


class ChatTaskConfig(BaseModel):
    """Chat SFT on JSON lines: {"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["chat"] = Field(description="task name; selects this task")
    train_file: str = Field(description="chat JSON lines to train on")
    eval_file: str | None = Field(
        None, description="chat JSON lines to score after training (eval/loss); serves both eval splits")


class LivedoorSFTTaskConfig(LivedoorSFTConfig, LivedoorSplitConfig):
    """A Japanese chat SFT set from the livedoor tarball: article -> title, article -> genre name."""

    name: Literal["livedoor_sft"] = Field(description="task name; selects this task")


# The job file's union on `name` is trainer.config.TaskConfig.
AnyTaskConfig = LivedoorTaskConfig | JGLUETaskConfig | ChatTaskConfig | LivedoorSFTTaskConfig

# The tasks each fine-tuning objective reads: seq2seq's are text-to-text Examples, causal_lm's
# conversations.
OBJECTIVE_TASKS: dict[str, tuple[str, ...]] = {"seq2seq": ("livedoor", "jglue"),
                                               "causal_lm": ("chat", "livedoor_sft")}


@dataclass
class EvalResult:
    """What an evaluation produced: flat numeric metrics, the report's text, the files written."""

    metrics: dict[str, float]
    report: str
    files: list[Path] = field(default_factory=list)


# (examples, generated texts, output directory, file prefix) -> the result, files written
Evaluator = Callable[[list[Example], list[str], Path, str], EvalResult]
# (example, its generated text) -> is that answer right: the task's own accuracy or exact match
# per example (pass@1 of `t5ja eval`)
CorrectPredicate = Callable[[Example, str], bool]


@dataclass
class TaskData:
    """A task's examples by split ("train", "validation", "test"), its read reports, its evaluator,
    and whether one answer is right (None where the task has no such notion: JSTS's scores)."""

    splits: dict[str, list[Example]]
    reports: list[ReadReport]
    evaluate: Evaluator
    is_correct: CorrectPredicate | None = None

    def summary(self) -> str:
        sizes = ", ".join(f"{name} {len(examples)}" for name, examples in self.splits.items())
        return "\n".join([f"splits: {sizes}", *(report.summary() for report in self.reports)])


# The task fields that name input files (those set must exist).
TASK_FILE_KEYS = ("path", "train_file", "eval_file")


def get_task_path_problems(cfg: AnyTaskConfig) -> list[tuple[str, str]]:
    """(yaml path, message) for each input file of the task that does not exist."""
    files = {key: getattr(cfg, key) for key in TASK_FILE_KEYS if getattr(cfg, key, None)}
    return [(f"task.{key}", f"{path}: no such file") for key, path in files.items() if not Path(path).is_file()]


def get_task_objective_problems(cfg: AnyTaskConfig, objective: str) -> list[tuple[str, str]]:
    """A task of another objective's kind (a chat set under seq2seq, livedoor under causal_lm)."""
    wanted = OBJECTIVE_TASKS.get(objective, ())
    if cfg.name in wanted:
        return []
    owner = next((name for name, tasks in OBJECTIVE_TASKS.items() if cfg.name in tasks), "?")
    return [("task.name", f"{cfg.name} is a task of objective {owner}; objective {objective} reads "
                          f"{' or '.join(wanted)}")]


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

    def is_correct(example: Example, prediction: str) -> bool:
        return parse_predictions([prediction], task.labels)[0] == example.label

    return TaskData(splits, [task.corpus.report], evaluate, is_correct)


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
                    evaluate, TASKS[cfg.task].is_correct)


_LOADERS: dict[str, Callable[..., TaskData]] = {"livedoor": _load_livedoor, "jglue": _load_jglue}


# ---- chat tasks (objective causal_lm) -------------------------------------------------------

@dataclass
class ChatTaskData:
    """A chat task's conversations by split ("train"; "validation" and "test" when it has them)."""

    splits: dict[str, list[list[Message]]]
    reports: list[ReadReport]

    def summary(self) -> str:
        sizes = ", ".join(f"{name} {len(conversations)}" for name, conversations in self.splits.items())
        return "\n".join([f"conversations: {sizes}", *(report.summary() for report in self.reports)])


def load_chat_task(cfg: ChatTaskConfig | LivedoorSFTTaskConfig) -> ChatTaskData:
    """Read the task's conversations; deterministic, so every rank gets the same ones."""
    if isinstance(cfg, LivedoorSFTTaskConfig):
        return _load_livedoor_sft(cfg)
    train, report = read_chat_jsonl(cfg.train_file)
    splits, reports = {"train": train}, [report]
    if cfg.eval_file:
        held_out, eval_report = read_chat_jsonl(cfg.eval_file)
        splits.update(validation=held_out, test=held_out)
        reports.append(eval_report)
    return ChatTaskData(splits, reports)


def _load_livedoor_sft(cfg: LivedoorSFTTaskConfig) -> ChatTaskData:
    corpus = read_livedoor(cfg.path)
    parts = split_articles(corpus.articles, cfg)
    names = {"train": "train", "validation": "valid", "test": "test"}
    splits = {split: build_livedoor_sft(parts[part], cfg) for split, part in names.items() if parts[part]}
    return ChatTaskData(splits, [corpus.report])
