"""`t5ja train` with objective seq2seq on each JGLUE task, fixture-sized: real torchrun, 2 ranks,
DeepSpeed on CPU (ZeRO-3 for JSQuAD, ZeRO-2 for the others), initialised from a Hugging Face
t5-tiny directory, then evaluated by greedy generation: predictions, the task's report and
metrics files, MLflow metrics and artifacts.

The task files are written here in JGLUE v1.1's formats (JSQuAD: SQuAD-v1.1 JSON with contexts
"<title> [SEP] <text>" and three answers per evaluation question; JNLI, JSTS, JCommonsenseQA:
JSON lines, JSTS's scores as strings), six training and three evaluation records each. Random
weights answer nothing right: the figures are checked for their names and ranges, and against
the files and MLflow, not for their values."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import run_t5ja, seed_mlflow_db

pytestmark = pytest.mark.multiproc
STEPS = 3  # 4 examples a step over 6: the third step is in the second epoch
NUM_EVAL = 3  # evaluated in batches of 2: one full, one partial

# --- the task files, in JGLUE v1.1's formats --------------------------------------------------

JSQUAD_ARTICLES = [  # (title, text, [(question, answers)]); each answer is a span of the text
    ("富士山", "富士山は静岡県と山梨県にまたがる活火山である。標高は3776メートルで、日本で最も高い山である。",
     [("富士山はどの県にまたがっている?", ("静岡県と山梨県",)), ("富士山の標高は?", ("3776メートル",)),
      ("日本で最も高い山は?", ("富士山",))]),
    ("琵琶湖", "琵琶湖は滋賀県にある湖で、日本最大の面積を持つ。京都や大阪の水源として使われている。",
     [("琵琶湖がある県は?", ("滋賀県",)), ("琵琶湖は何の水源?", ("京都や大阪",)), ("日本最大の湖は?", ("琵琶湖",))]),
    # The evaluation questions have three annotators' answers, repeats included, as valid-v1.1.json.
    ("東京タワー", "東京タワーは1958年に完成した電波塔である。高さは333メートルで、港区芝公園にある。",
     [("東京タワーが完成した年は?", ("1958年", "1958年", "1958")),
      ("東京タワーの高さは?", ("333メートル", "333メートル", "333メートル")),
      ("東京タワーはどこにある?", ("港区芝公園", "芝公園", "港区芝公園"))]),
]
NLI_PAIRS = [  # (sentence1, sentence2, JNLI label, JSTS score)
    ("男性がサーフボードに乗って波に乗っている。", "男性が波の上でサーフィンをしている。", "entailment", 4.6),
    ("二匹の犬が芝生の上で遊んでいる。", "猫が一匹ソファで寝ている。", "contradiction", 0.4),
    ("女性がキッチンで料理をしている。", "女性が夕食を作っている。", "neutral", 3.2),
    ("子供たちが公園でボールを蹴っている。", "子供たちが外で遊んでいる。", "entailment", 3.8),
    ("電車が駅に停まっている。", "電車が高速で走っている。", "contradiction", 1.6),
    ("男性がギターを弾いている。", "男性がステージで演奏している。", "neutral", 2.4),
    ("白い猫が窓辺に座っている。", "猫が窓のそばにいる。", "entailment", 4.2),
    ("バスが道路を走っている。", "バスが車庫に止まっている。", "contradiction", 1.0),
    ("少年が本を読んでいる。", "少年が漫画を読んでいる。", "neutral", 3.0),
]
JCQA_QUESTIONS = [  # (question, five choices, index of the answer)
    ("主に子ども向けのもので、イラストのついた物語が書かれているものはどれ?", ("世界", "写真集", "絵本", "論文", "図鑑"), 2),
    ("未成年者を監護・教育し、財産を管理する人は?", ("浮浪者", "保護者", "お坊さん", "宗教者", "預言者"), 1),
    ("雨の日に使うものは?", ("傘", "扇風機", "水着", "日傘", "帽子"), 0),
    ("魚を焼くときに使う道具は?", ("掃除機", "洗濯機", "冷蔵庫", "グリル", "電卓"), 3),
    ("手紙を送るときに貼るものは?", ("シール", "付箋", "切手", "写真", "名札"), 2),
    ("夜空に見えるものは?", ("虹", "星", "入道雲", "夕焼け", "朝日"), 1),
    ("歯を磨くときに使うものは?", ("歯ブラシ", "くし", "はさみ", "鉛筆", "箸"), 0),
    ("本を借りることができる場所は?", ("銀行", "病院", "駅", "図書館", "郵便局"), 3),
    ("冬に雪の上を滑る道具は?", ("浮き輪", "スキー", "自転車", "釣り竿", "ラケット"), 1),
]


def jsquad_file(articles: list) -> dict:
    data = []
    for a, (title, text, questions) in enumerate(articles):
        context = f"{title} [SEP] {text}"
        qas = [{"question": question, "id": f"a{a}p0q{q}", "is_impossible": False,
                "answers": [{"text": answer, "answer_start": context.index(answer)} for answer in answers]}
               for q, (question, answers) in enumerate(questions)]
        data.append({"title": title, "paragraphs": [{"qas": qas, "context": context}]})
    return {"data": data}


def jnli_records(pairs: list) -> list[dict]:
    return [{"sentence_pair_id": str(i), "yjcaptions_id": f"{100 + i}-{200 + i}-{300 + i}", "sentence1": s1,
             "sentence2": s2, "label": label} for i, (s1, s2, label, _) in enumerate(pairs)]


def jsts_records(pairs: list) -> list[dict]:
    """The score as a string ("label": "4.6"), as the release writes it."""
    return [{"sentence_pair_id": str(i), "yjcaptions_id": f"{100 + i}-{200 + i}-{300 + i}", "sentence1": s1,
             "sentence2": s2, "label": f"{score:.1f}"} for i, (s1, s2, _, score) in enumerate(pairs)]


def jcqa_records(questions: list) -> list[dict]:
    return [{"q_id": i, "question": question, **{f"choice{c}": choice for c, choice in enumerate(choices)},
             "label": label} for i, (question, choices, label) in enumerate(questions)]


def write_json(path: Path, content: dict) -> Path:
    path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return path


def write_json_lines(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_task_files(task: str, out: Path) -> tuple[Path, Path]:
    """(train-v1.1.json, valid-v1.1.json): six training records, three evaluation records."""
    if task == "jsquad":  # two articles to train on, one to evaluate
        return (write_json(out / "train-v1.1.json", jsquad_file(JSQUAD_ARTICLES[:2])),
                write_json(out / "valid-v1.1.json", jsquad_file(JSQUAD_ARTICLES[2:])))
    records = {"jnli": jnli_records(NLI_PAIRS), "jsts": jsts_records(NLI_PAIRS),
               "jcommonsenseqa": jcqa_records(JCQA_QUESTIONS)}[task]
    return (write_json_lines(out / "train-v1.1.json", records[:-NUM_EVAL]),
            write_json_lines(out / "valid-v1.1.json", records[-NUM_EVAL:]))


# --- one run per task -------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    stage: str  # ds_configs/<stage>.json
    split: str  # eval.split: JGLUE's eval_file serves both
    ranges: dict[str, tuple[float, float]]  # the task's figures, named as finetune/jglue.py does, and their range


CASES = {
    "jsquad": Case("zero3", "validation", {"exact_match": (0, 100), "f1": (0, 100)}),
    "jnli": Case("zero2", "test", {"accuracy": (0, 1), "num_invalid": (0, NUM_EVAL)}),
    "jsts": Case("zero2", "validation", {"pearson": (-1, 1), "spearman": (-1, 1), "num_unparseable": (0, NUM_EVAL)}),
    "jcommonsenseqa": Case("zero2", "test", {"accuracy": (0, 1), "num_invalid": (0, NUM_EVAL)}),
}


@dataclass
class JGLUERun:
    task: str
    case: Case
    out: Path
    run_dir: Path
    task_cfg: dict


def write_job(out: Path, init_from: Path, task_cfg: dict, case: Case) -> Path:
    job = {
        "name": "ft", "output_dir": str(out),
        "model": {"preset": "t5-tiny", "init_from": str(init_from)},
        # Room for every fixture text: neko's tokenizer writes ASCII one token a letter ("contradiction": 14).
        "objective": {"name": "seq2seq", "input_length": 128, "target_length": 16},
        "task": task_cfg,
        "train": {"steps": STEPS, "global_batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "precision": "fp32",
                  "log_every": 1, "warmup_steps": 0},
        "eval": {"split": case.split, "batch_size": 2},
        "deepspeed": {"config": case.stage},
        "checkpoint": {"every_steps": 0},
        "telemetry": {"busbw_probe_mb": 0},
        "mlflow": {"log_model": False},  # the livedoor run checks the export's upload
        "launcher": {"nproc_per_node": 2},
    }
    path = out / "ft.yaml"
    path.write_text(yaml.safe_dump(job, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=list(CASES))
def jglue_run(request, tmp_path_factory, tiny_hf_model, mlflow_db) -> JGLUERun:
    task, case = request.param, CASES[request.param]
    out = tmp_path_factory.mktemp(task)
    seed_mlflow_db(mlflow_db, out)
    train_file, eval_file = write_task_files(task, out)
    task_cfg = {"name": "jglue", "task": task, "train_file": str(train_file), "eval_file": str(eval_file)}
    result = run_t5ja("train", str(write_job(out, tiny_hf_model, task_cfg, case)))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return JGLUERun(task, case, out, out / "ft", task_cfg)


def test_every_jglue_task_has_a_run():
    from finetune.jglue import TASKS

    assert set(CASES) == set(TASKS)


def get_eval_examples(run: JGLUERun) -> list:
    from finetune.tasks import JGLUETaskConfig, load_task

    return load_task(JGLUETaskConfig(**run.task_cfg)).splits[run.case.split]


def test_it_trains_and_predicts_every_eval_example(jglue_run):
    log = (jglue_run.run_dir / "logs" / "rank_0.log").read_text(encoding="utf-8")
    assert "train-v1.1.json: 6 kept, 0 skipped" in log and f"valid-v1.1.json: {NUM_EVAL} kept, 0 skipped" in log
    assert "truncated: 0 input(s), 0 target(s)" in log
    losses = [json.loads(line) for line in (jglue_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {m["step"]: m["train/loss"] for m in losses if "train/loss" in m}
    assert list(losses) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in losses.values())
    examples = get_eval_examples(jglue_run)
    path = jglue_run.run_dir / "predictions" / f"{jglue_run.case.split}.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(examples) == NUM_EVAL
    assert [(r["id"], r["target"]) for r in records] == [(e.id, e.target) for e in examples]
    assert all(isinstance(r["prediction"], str) and r["error"] is None for r in records)


def test_report_and_metrics_have_the_task_figures(jglue_run):
    split, eval_dir = jglue_run.case.split, jglue_run.run_dir / "eval"
    metrics = json.loads((eval_dir / f"{split}_metrics.json").read_text())
    for name, (low, high) in jglue_run.case.ranges.items():
        assert low <= metrics[name] <= high, (name, metrics[name])
    assert metrics["num_examples"] == NUM_EVAL and metrics["num_errors"] == 0
    title, body = (eval_dir / f"{split}_report.txt").read_text(encoding="utf-8").split("\n", 1)
    assert title == f"{jglue_run.task} ({NUM_EVAL} examples)"
    assert json.loads(body) == {name: metrics[name] for name in jglue_run.case.ranges}


def test_mlflow_has_eval_metrics_and_artifacts(jglue_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{jglue_run.out / 'mlflow.db'}")
    run = client.get_run((jglue_run.run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED"
    assert run.data.params["task.name"] == "jglue" and run.data.params["task.task"] == jglue_run.task
    split = jglue_run.case.split
    expected = json.loads((jglue_run.run_dir / "eval" / f"{split}_metrics.json").read_text())
    for name in (*jglue_run.case.ranges, "num_examples", "num_errors"):
        assert run.data.metrics[f"eval/{name}"] == pytest.approx(expected[name]), name
    artifacts = {a.path for folder in ("eval", "predictions") for a in client.list_artifacts(run.info.run_id, folder)}
    assert artifacts == {f"eval/{split}_report.txt", f"eval/{split}_metrics.json", f"predictions/{split}.jsonl"}
