"""finetune.jglue: readers of the four JGLUE formats, their text-to-text form and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from finetune.jglue import (TASKS, UNPARSEABLE_SCORE, JGLUEConfig, evaluate_task, format_score, parse_score,
                            read_task)

JSQUAD = {"version": "v1.0", "data": [{"title": "東京", "paragraphs": [{
    "context": "東京 [SEP] 東京は日本の首都である。人口は約1400万人。",
    "qas": [{"id": "a1", "question": "日本の首都はどこ?", "is_impossible": False,
             "answers": [{"text": "東京", "answer_start": 11}, {"text": "東京都", "answer_start": 11}]},
            {"id": "a2", "question": "人口は?", "is_impossible": False, "answers": []},
            {"id": "a3", "question": "人口は?", "is_impossible": False,
             "answers": [{"text": "約1400万人", "answer_start": 25}]}]}]}]}
JNLI = [{"sentence_pair_id": "0", "yjcaptions_id": "1", "sentence1": "猫が寝ている。", "sentence2": "動物が寝ている。",
         "label": "entailment"},
        {"sentence_pair_id": "1", "yjcaptions_id": "2", "sentence1": "犬が走る。", "sentence2": "犬が寝ている。",
         "label": "contradiction"},
        {"sentence_pair_id": "2", "sentence1": "犬が走る。", "sentence2": "x", "label": "maybe"}]
# The release writes JSTS scores as strings ("4.4"); numbers are read too.
JSTS = [{"sentence_pair_id": "0", "yjcaptions_id": "1", "sentence1": "猫が寝ている。", "sentence2": "猫が眠る。", "label": "4.4"},
        {"sentence_pair_id": "1", "yjcaptions_id": "2", "sentence1": "犬が走る。", "sentence2": "空が青い。", "label": 0.0},
        {"sentence_pair_id": "2", "yjcaptions_id": "3", "sentence1": "犬が走る。", "sentence2": "犬が歩く。", "label": "2.8"},
        {"sentence_pair_id": "3", "sentence1": "a", "sentence2": "b", "label": 7},
        {"sentence_pair_id": "4", "sentence1": "a", "sentence2": "b", "label": "高い"}]
JCQA = [{"q_id": 0, "question": "主に子ども向けのもので、イラストのついた物語が書かれているものはどれ?",
         "choice0": "世界", "choice1": "写真集", "choice2": "絵本", "choice3": "論文", "choice4": "図鑑", "label": 2},
        {"q_id": 1, "question": "未成年者を監護・教育し、財産を管理する人は?",
         "choice0": "浮浪者", "choice1": "保護者", "choice2": "お坊さん", "choice3": "宗教者", "choice4": "預言者", "label": 1},
        {"q_id": 2, "question": "欠けた選択肢", "choice0": "a", "label": 0}]


def _write_lines(path: Path, records: list[dict], extra_lines: tuple[str, ...] = ()) -> str:
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _config(tmp_path: Path, task: str, records) -> JGLUEConfig:
    if task == "jsquad":
        path = tmp_path / "jsquad.json"
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        path = str(path)
    else:
        path = _write_lines(tmp_path / f"{task}.json", records, ("{not json",))
    return JGLUEConfig(task=task, train_file=path, eval_file=path)


def test_jsquad_format_skips_and_scores(tmp_path):
    examples, report = read_task(_config(tmp_path, "jsquad", JSQUAD))["eval"]
    assert [e.id for e in examples] == ["a1", "a3"]
    assert report.skipped[0][0].endswith("qas[1]") and "no non-empty answer" in report.skipped[0][1]
    assert examples[0].input == "question: 日本の首都はどこ? context: 東京 [SEP] 東京は日本の首都である。人口は約1400万人。"
    assert examples[0].target == "東京" and examples[0].references == ("東京", "東京都")
    raw = read_task(_config(tmp_path, "jsquad", JSQUAD).model_copy(update={"normalize": False}))["eval"][0]
    assert raw[0].input == examples[0].input  # the " [SEP] " survives neologdn
    scores = evaluate_task("jsquad", examples, ["東京都", "1400万人"])
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 * (6 / 6) * (6 / 7) / (1 + 6 / 7)) / 2)


def test_jnli_reads_formats_and_scores(tmp_path):
    examples, report = read_task(_config(tmp_path, "jnli", JNLI))["train"]
    assert len(examples) == 2 and report.num_skipped == 2  # the bad label and the bad JSON line
    assert "expected one of" in dict(report.skipped)[f"{tmp_path}/jnli.json:3"]
    assert examples[0].input == "jnli premise: 猫が寝ている。 hypothesis: 動物が寝ている。"
    assert examples[0].target == "entailment"
    scores = evaluate_task("jnli", examples, ["entailment", "neutral?"])
    assert scores == {"accuracy": 0.5, "num_invalid": 1}


def test_jsts_targets_scores_as_text_and_counts_unparseable(tmp_path):
    examples, report = read_task(_config(tmp_path, "jsts", JSTS))["eval"]
    assert [e.target for e in examples] == ["4.4", "0.0", "2.8"] and report.num_skipped == 3
    assert [e.label for e in examples] == [4.4, 0.0, 2.8]
    assert "expected a number in [0, 5]" in dict(report.skipped)[f"{tmp_path}/jsts.json:5"]
    assert format_score(3.05) == "3.0" and format_score(3.5) == "3.6"  # 0.2 steps, as T5's STS-B
    assert parse_score(" 3.2") == 3.2 and parse_score("高い") is None and parse_score("nan") is None
    perfect = evaluate_task("jsts", examples, ["4.4", "0.0", "2.8"])
    assert perfect["pearson"] == pytest.approx(1.0) and perfect["num_unparseable"] == 0
    broken = evaluate_task("jsts", examples, ["だめ", "0.0", "2.8"])  # scored -1: now the lowest
    assert broken["num_unparseable"] == 1 and broken["spearman"] < 1.0
    assert UNPARSEABLE_SCORE < 0


def test_jcommonsenseqa_lists_choices_and_scores(tmp_path):
    examples, report = read_task(_config(tmp_path, "jcommonsenseqa", JCQA))["eval"]
    assert len(examples) == 2 and "missing key(s)" in report.skipped[0][1]
    assert "choices: (0) 世界 (1) 写真集 (2) 絵本 (3) 論文 (4) 図鑑" in examples[0].input
    assert examples[0].target == "絵本" and examples[0].label == 2
    assert evaluate_task("jcommonsenseqa", examples, ["絵本", "保護者じゃない"]) == {"accuracy": 0.5, "num_invalid": 1}


def test_normalisation_is_applied_when_asked(tmp_path):
    records = [dict(JNLI[0], sentence1="ｶﾀｶﾅ　で　書く")]
    path = _write_lines(tmp_path / "n.json", records)
    raw = read_task(JGLUEConfig(task="jnli", train_file=path, eval_file=path, normalize=False))["eval"][0]
    normalised = read_task(JGLUEConfig(task="jnli", train_file=path, eval_file=path))["eval"][0]
    assert "ｶﾀｶﾅ" in raw[0].input and "カタカナで書く" in normalised[0].input


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValidationError, match="task"):
        JGLUEConfig(task="marc", train_file="a", eval_file="b")
    empty = _write_lines(tmp_path / "empty.json", [], ("[1, 2]",))
    with pytest.raises(ValueError, match="no usable record"):
        read_task(JGLUEConfig(task="jnli", train_file=empty, eval_file=empty))
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_task(JGLUEConfig(task="jsts", train_file=str(tmp_path / "x"), eval_file="y"))
    with pytest.raises(ValueError, match="2 examples but 1"):
        evaluate_task("jnli", [None, None], ["x"])
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"data": ["not an article", {"paragraphs": [{"qas": None}]}]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\[0\]: expected an object with a 'paragraphs' list"):
        read_task(JGLUEConfig(task="jsquad", train_file=str(broken), eval_file=str(broken)))
    assert set(TASKS) == {"jsquad", "jnli", "jsts", "jcommonsenseqa"}
