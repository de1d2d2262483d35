"""Metrics of the fine-tuning tasks: pure functions of gold values and predictions.

Classification uses scikit-learn's own `classification_report`/`confusion_matrix`, so the
report has exactly its layout (label, precision, recall, f1-score, support; accuracy; macro
avg; weighted avg). Correlations use scipy.stats (a dependency of scikit-learn).

SQuAD v1.1 EM/F1 follow the official evaluation script (Rajpurkar et al. 2016): lower-case,
drop ASCII punctuation and English articles, collapse whitespace; best score over the gold
answers; mean x 100. One change, for Japanese: F1 counts overlapping *characters* (whitespace
excluded), not whitespace-separated words, because Japanese is written without spaces and
word F1 would be all-or-nothing. JGLUE (Kurihara et al. 2022) reports JSQuAD F1 on characters
for the same reason, so our figures are comparable with its baselines.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def get_accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """Share of exact matches; an empty evaluation set is an error, not 0 or 1."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} gold values but {len(y_pred)} predictions")
    if not y_true:
        raise ValueError("no examples to score")
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


@dataclass
class ClassificationResult:
    """scikit-learn's report as text and as a dict, and the confusion matrix (rows: gold)."""

    text: str
    metrics: dict
    confusion: np.ndarray
    labels: list[str]


def get_classification_result(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str],
                              digits: int = 2) -> ClassificationResult:
    """The report over `labels` (in that order); a prediction outside them gets its own row.

    The extra row (e.g. "<invalid>" for text that names no label) keeps the report honest:
    restricting sklearn to the known labels would silently turn "accuracy" into "micro avg".
    """
    from sklearn.metrics import classification_report, confusion_matrix

    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} gold labels but {len(y_pred)} predictions")
    unknown_gold = sorted(set(y_true) - set(labels))
    if unknown_gold:
        raise ValueError(f"gold labels {unknown_gold} are not among the task's labels {list(labels)}")
    extra = sorted(set(y_pred) - set(labels))
    all_labels = [*labels, *extra]
    # zero_division=0: a label never predicted has precision 0, without sklearn's warning.
    kwargs = dict(labels=all_labels, zero_division=0)
    return ClassificationResult(
        text=classification_report(y_true, y_pred, digits=digits, **kwargs),
        metrics=classification_report(y_true, y_pred, output_dict=True, **kwargs),
        confusion=confusion_matrix(y_true, y_pred, labels=all_labels),
        labels=all_labels,
    )


def save_confusion_matrix_png(result: ClassificationResult, path: str | Path, title: str = "") -> Path:
    """The confusion matrix as a PNG (counts in the cells, gold on the rows).

    Drawn with matplotlib's Agg canvas directly, not pyplot: no global backend switch, no
    display needed, and nothing left open in a long-running trainer.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    num_labels = len(result.labels)
    size = max(4.0, 0.6 * num_labels + 2)
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(result.confusion, cmap="Blues")
    ticks = range(num_labels)
    ax.set_xticks(ticks, result.labels, rotation=45, ha="right")
    ax.set_yticks(ticks, result.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    _annotate_cells(ax, result.confusion)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def _annotate_cells(ax, matrix: np.ndarray) -> None:
    # White text on the dark half of the colour map, black on the light half.
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center",
                color="white" if count > threshold else "black", fontsize=8)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower-case, no ASCII punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def get_exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def get_char_f1(prediction: str, gold: str) -> float:
    """F1 of the overlapping characters (a multiset) of the normalised strings, spaces excluded."""
    pred_chars = list(normalize_answer(prediction).replace(" ", ""))
    gold_chars = list(normalize_answer(gold).replace(" ", ""))
    if not pred_chars or not gold_chars:
        # As the SQuAD v2 script does: two empty answers agree, one empty one does not.
        return float(pred_chars == gold_chars)
    num_same = sum((Counter(pred_chars) & Counter(gold_chars)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred_chars), num_same / len(gold_chars)
    return 2 * precision * recall / (precision + recall)


def get_squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"exact_match", "f1"} in percent (as the SQuAD script), each the best over the gold answers."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(references)} questions but {len(predictions)} predictions")
    if not predictions:
        raise ValueError("no examples to score")
    for index, golds in enumerate(references):
        if not golds:
            raise ValueError(f"question {index} has no gold answer")
    em = sum(max(get_exact_match(p, g) for g in golds) for p, golds in zip(predictions, references))
    f1 = sum(max(get_char_f1(p, g) for g in golds) for p, golds in zip(predictions, references))
    return {"exact_match": 100 * em / len(predictions), "f1": 100 * f1 / len(predictions)}


def get_correlations(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation (JSTS); needs two or more pairs that are not all equal."""
    from scipy.stats import pearsonr, spearmanr

    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} gold scores but {len(y_pred)} predictions")
    if len(y_true) < 2:
        raise ValueError(f"correlations need at least 2 pairs, got {len(y_true)}")
    if len(set(y_pred)) == 1 or len(set(y_true)) == 1:
        # scipy would return nan with a warning; a constant predictor has no correlation.
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": float(pearsonr(y_true, y_pred).statistic),
            "spearman": float(spearmanr(y_true, y_pred).statistic)}
