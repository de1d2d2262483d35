"""finetune.metrics: scikit-learn's report layout, the confusion PNG, SQuAD v1 EM/char-F1, correlations."""

from __future__ import annotations

import pytest

from finetune.metrics import (get_accuracy, get_char_f1, get_classification_result, get_correlations,
                              get_exact_match, get_squad_scores, normalize_answer, save_confusion_matrix_png)

GOLD = ["a", "a", "b", "b", "c", "c"]
PRED = ["a", "b", "b", "b", "c", "a"]


def test_classification_report_has_sklearns_layout_and_dict():
    result = get_classification_result(GOLD, PRED, ["a", "b", "c"])
    header, *rows = [line.split() for line in result.text.splitlines() if line.strip()]
    assert header == ["precision", "recall", "f1-score", "support"]
    assert [row[0] for row in rows[:3]] == ["a", "b", "c"]
    assert rows[3][0] == "accuracy" and rows[3][-2:] == ["0.67", "6"]
    assert [" ".join(row[:2]) for row in rows[4:]] == ["macro avg", "weighted avg"]
    assert result.metrics["b"]["precision"] == pytest.approx(2 / 3) and result.metrics["b"]["recall"] == 1.0
    assert result.metrics["accuracy"] == pytest.approx(4 / 6)
    assert result.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_prediction_outside_the_labels_gets_its_own_row_and_keeps_accuracy():
    result = get_classification_result(["a", "b"], ["a", "<invalid>"], ["a", "b"])
    assert result.labels == ["a", "b", "<invalid>"]
    assert "accuracy" in result.text and "micro avg" not in result.text
    assert result.metrics["accuracy"] == 0.5 and result.metrics["<invalid>"]["support"] == 0


def test_unknown_gold_label_and_length_mismatch_are_errors():
    with pytest.raises(ValueError, match="not among the task's labels"):
        get_classification_result(["z"], ["a"], ["a"])
    with pytest.raises(ValueError, match="2 gold labels but 1"):
        get_classification_result(["a", "a"], ["a"], ["a"])


def test_confusion_matrix_png(tmp_path):
    result = get_classification_result(GOLD, PRED, ["a", "b", "c"])
    path = save_confusion_matrix_png(result, tmp_path / "sub" / "cm.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_squad_normalisation_and_exact_match():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert get_exact_match("東京都", "東京都") == 1.0 and get_exact_match("東京", "東京都") == 0.0


def test_char_f1_on_japanese():
    # 2 of 2 predicted characters are right, 2 of 3 gold ones found: P 1, R 2/3, F1 0.8.
    assert get_char_f1("東京", "東京都") == pytest.approx(0.8)
    assert get_char_f1("大阪", "東京都") == 0.0
    assert get_char_f1("", "") == 1.0 and get_char_f1("", "東京") == 0.0


def test_squad_scores_take_the_best_gold_answer_in_percent():
    scores = get_squad_scores(["東京", "大阪"], [["東京都", "東京"], ["京都"]])
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="no gold answer"):
        get_squad_scores(["x"], [[]])


def test_correlations_and_accuracy():
    scores = get_correlations([0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 4.0, 7.0])
    assert scores["spearman"] == pytest.approx(1.0) and 0.98 < scores["pearson"] < 1.0
    assert get_correlations([1.0, 2.0], [3.0, 3.0]) == {"pearson": 0.0, "spearman": 0.0}
    assert get_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError, match="no examples"):
        get_accuracy([], [])
