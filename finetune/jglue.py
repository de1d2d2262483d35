"""JGLUE (Kurihara et al. 2022) as text-to-text tasks for T5: readers, formats and metrics.

File formats (JGLUE v1.1 release, `datasets/<task>-v1.1/{train,valid}-v1.1.json`):
- JSQuAD: SQuAD-v1.1 JSON, `data[].paragraphs[].qas[]`, context "<title> [SEP] <text>".
- JNLI, JSTS, JCommonsenseQA: JSON lines (one object per line, despite the .json suffix).
  JSTS's label is the score as a JSON string ("label": "4.4"); a JSON number is read too.

Each task is a row of TASKS (reader, evaluator): no branch on a task name. Input prefixes
follow T5's GLUE formats (Raffel et al. 2020, appendix D: "stsb sentence1: ... sentence2: ...",
"mnli hypothesis: ... premise: ...", "question: ... context: ...").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune import Example, ReadReport, read_json_lines
from finetune.metrics import get_accuracy, get_correlations, get_exact_match, get_squad_scores

NLI_LABELS = ("entailment", "contradiction", "neutral")
NUM_CHOICES = 5  # JCommonsenseQA: choice0..choice4
SEP = " [SEP] "  # JSQuAD's context: "<title> [SEP] <text>"
# T5's post-processor for STS-B scores text that is no number as -1 (t5.data.postprocessors.
# string_to_float): outside [0, 5], so a model that writes junk is penalised, not ignored.
UNPARSEABLE_SCORE = -1.0


class JGLUEConfig(BaseModel):
    """One JGLUE task: which one and its files."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["jsquad", "jnli", "jsts", "jcommonsenseqa"] = Field(description="the JGLUE task")
    train_file: str = Field(description="training split (train-v1.1.json)")
    eval_file: str = Field(description="evaluation split (valid-v1.1.json: JGLUE's test labels are not public)")
    normalize: bool = Field(True, description="apply data prep's neologdn normalisation to inputs and targets")


def _identity(text: str) -> str:
    return text


def _normalizer(normalize: bool) -> Callable[[str], str]:
    # Single-line fields: the normaliser's line handling never joins anything here.
    from data_prep.clean import normalize_neologdn  # here: pyarrow's kernels come with it, and job validation needs none

    return normalize_neologdn if normalize else _identity


def _require(record: dict, keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in record]
    if missing:
        raise ValueError(f"missing key(s) {missing}")
    empty = [key for key in keys if isinstance(record[key], str) and not record[key].strip()]
    if empty:
        raise ValueError(f"empty text in {empty}")


def _read_records(path: str | Path, build: Callable[[str, dict], Example]) -> tuple[list[Example], ReadReport]:
    report, examples = ReadReport(str(path)), []
    for where, record in read_json_lines(path, report):
        try:
            examples.append(build(where, record))
        except (ValueError, TypeError) as err:
            report.skip(where, str(err))
    report.num_kept = len(examples)
    return examples, report


# --- JNLI ------------------------------------------------------------------------------------

def build_jnli_example(where: str, record: dict, norm: Callable[[str], str]) -> Example:
    _require(record, ("sentence1", "sentence2", "label"))
    if record["label"] not in NLI_LABELS:
        raise ValueError(f"label {record['label']!r}; expected one of {list(NLI_LABELS)}")
    text = f"jnli premise: {norm(record['sentence1'])} hypothesis: {norm(record['sentence2'])}"
    return Example(str(record.get("sentence_pair_id", where)), text, record["label"], label=record["label"])


def evaluate_jnli(examples: list[Example], predictions: list[str]) -> dict:
    predicted = [p.strip() for p in predictions]
    return {"accuracy": get_accuracy([e.label for e in examples], predicted),
            "num_invalid": sum(p not in NLI_LABELS for p in predicted)}


def is_jnli_correct(example: Example, prediction: str) -> bool:
    return prediction.strip() == example.label


# --- JSTS ------------------------------------------------------------------------------------

def format_score(score: float) -> str:
    """The target text of a similarity score: rounded to 0.2 steps, one decimal (T5's STS-B)."""
    return f"{round(score * 5) / 5:.1f}"


def parse_score(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def get_jsts_score(label: object) -> float | None:
    """The gold score of a JSTS label: the release writes it as a string ("4.4"), a number is
    taken as well; None for anything else (a bool, text that is no finite number)."""
    if isinstance(label, str):
        return parse_score(label)
    if isinstance(label, (int, float)) and not isinstance(label, bool) and math.isfinite(label):
        return float(label)
    return None


def build_jsts_example(where: str, record: dict, norm: Callable[[str], str]) -> Example:
    _require(record, ("sentence1", "sentence2", "label"))
    score = get_jsts_score(record["label"])
    if score is None or not 0 <= score <= 5:
        raise ValueError(f"label {record['label']!r}; expected a number in [0, 5] (or one as a string)")
    text = f"jsts sentence1: {norm(record['sentence1'])} sentence2: {norm(record['sentence2'])}"
    return Example(str(record.get("sentence_pair_id", where)), text, format_score(score), label=score)


def evaluate_jsts(examples: list[Example], predictions: list[str]) -> dict:
    """Pearson/Spearman against the unrounded gold scores; unparseable text scores -1, counted."""
    parsed = [parse_score(p) for p in predictions]
    scores = [UNPARSEABLE_SCORE if value is None else value for value in parsed]
    return {**get_correlations([e.label for e in examples], scores), "num_unparseable": parsed.count(None)}


# --- JCommonsenseQA -------------------------------------------------------------------------

def build_jcqa_example(where: str, record: dict, norm: Callable[[str], str]) -> Example:
    keys = tuple(f"choice{i}" for i in range(NUM_CHOICES))
    _require(record, ("question", *keys, "label"))
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_CHOICES:
        raise ValueError(f"label {label!r}; expected an integer 0..{NUM_CHOICES - 1}")
    choices = tuple(norm(str(record[key])) for key in keys)
    listed = " ".join(f"({i}) {choice}" for i, choice in enumerate(choices))
    text = f"jcommonsenseqa question: {norm(record['question'])} choices: {listed}"
    # The target is the answer's text (the choices travel in `references` for scoring).
    return Example(str(record.get("q_id", where)), text, choices[label], label=label, references=choices)


def parse_choice(text: str, choices: tuple[str, ...]) -> int | None:
    """The index of the choice the text names, or None (no match, or several equal choices)."""
    matches = [i for i, choice in enumerate(choices) if choice == text.strip()]
    return matches[0] if len(matches) == 1 else None


def evaluate_jcqa(examples: list[Example], predictions: list[str]) -> dict:
    predicted = [parse_choice(p, e.references) for e, p in zip(examples, predictions)]
    return {"accuracy": get_accuracy([e.label for e in examples], predicted), "num_invalid": predicted.count(None)}


def is_jcqa_correct(example: Example, prediction: str) -> bool:
    return parse_choice(prediction, example.references) == example.label


# --- JSQuAD ---------------------------------------------------------------------------------

def read_jsquad(path: str | Path, norm: Callable[[str], str]) -> tuple[list[Example], ReadReport]:
    """One example per question; the first gold answer is the target, all are references."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not SQuAD-v1.1 JSON with a top-level 'data' list: {err}") from None
    report, examples = ReadReport(str(path)), []
    for a, article in enumerate(data):
        for p, paragraph in enumerate(_children(article, "paragraphs", f"{path}:data[{a}]", report)):
            for q, qa in enumerate(_children(paragraph, "qas", f"{path}:data[{a}].paragraphs[{p}]", report)):
                where = f"{path}:data[{a}].paragraphs[{p}].qas[{q}]"
                try:
                    examples.append(build_jsquad_example(paragraph, qa, norm))
                except (ValueError, TypeError, KeyError) as err:
                    report.skip(where, str(err))
    report.num_kept = len(examples)
    return examples, report


def _children(node: object, key: str, where: str, report: ReadReport) -> list:
    """node[key] if it is a list; otherwise the node is reported and nothing under it is read."""
    children = node.get(key) if isinstance(node, dict) else None
    if not isinstance(children, list):
        report.skip(where, f"expected an object with a '{key}' list")
        return []
    return children


def normalize_context(context: str, norm: Callable[[str], str]) -> str:
    """Title and text normalised apart: neologdn would drop the spaces of " [SEP] " between
    Japanese characters (it removes spaces between them), and the separator must stay as is."""
    return SEP.join(norm(part) for part in context.split(SEP))


def build_jsquad_example(paragraph: dict, qa: dict, norm: Callable[[str], str]) -> Example:
    if "context" not in paragraph:
        raise ValueError("paragraph has no 'context'")
    _require(qa, ("id", "question", "answers"))
    answers = [norm(answer["text"]) for answer in qa["answers"] if str(answer.get("text", "")).strip()]
    if not answers:
        raise ValueError("no non-empty answer (SQuAD v1.1 questions all have one)")
    text = f"question: {norm(qa['question'])} context: {normalize_context(paragraph['context'], norm)}"
    return Example(str(qa["id"]), text, answers[0], references=tuple(answers))


def evaluate_jsquad(examples: list[Example], predictions: list[str]) -> dict:
    """SQuAD v1.1 EM/F1 in percent; F1 over characters (see finetune.metrics)."""
    return get_squad_scores(predictions, [e.references for e in examples])


def is_jsquad_correct(example: Example, prediction: str) -> bool:
    """An exact match (after SQuAD's normalisation) with any gold answer."""
    return any(get_exact_match(prediction, gold) for gold in example.references)


# --- the table -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    read: Callable[[str | Path, Callable[[str], str]], tuple[list[Example], ReadReport]]
    evaluate: Callable[[list[Example], list[str]], dict]
    # Is one prediction right (pass@1, `t5ja eval`)? The task's own accuracy or EM, per example.
    # None for JSTS: a similarity score is graded, not right or wrong, and any tolerance would be
    # a threshold of ours; Pearson and Spearman are its measure.
    is_correct: Callable[[Example, str], bool] | None


def _json_lines_reader(build):
    return lambda path, norm: _read_records(path, lambda where, record: build(where, record, norm))


TASKS: dict[str, Task] = {
    "jsquad": Task(read_jsquad, evaluate_jsquad, is_jsquad_correct),
    "jnli": Task(_json_lines_reader(build_jnli_example), evaluate_jnli, is_jnli_correct),
    "jsts": Task(_json_lines_reader(build_jsts_example), evaluate_jsts, None),
    "jcommonsenseqa": Task(_json_lines_reader(build_jcqa_example), evaluate_jcqa, is_jcqa_correct),
}


def read_task(cfg: JGLUEConfig) -> dict[str, tuple[list[Example], ReadReport]]:
    """{"train": (examples, report), "eval": (...)}; a split with no usable record is an error."""
    task, norm = TASKS[cfg.task], _normalizer(cfg.normalize)
    splits = {"train": task.read(cfg.train_file, norm), "eval": task.read(cfg.eval_file, norm)}
    for name, (examples, report) in splits.items():
        if not examples:
            raise ValueError(f"{cfg.task} {name}_file: no usable record\n{report.summary()}")
    return splits


def evaluate_task(task: str, examples: list[Example], predictions: list[str]) -> dict:
    if len(examples) != len(predictions):
        raise ValueError(f"{task}: {len(examples)} examples but {len(predictions)} predictions")
    return TASKS[task].evaluate(examples, predictions)
