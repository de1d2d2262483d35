"""`t5ja eval JOB.yaml`: the seed's evaluation metrics of a trained model. The pass@1 predicates,
the chat prompt and the ratings against hand-computed values; then the real command on a
random-weight t5-tiny (livedoor fixture tarball) and gemma-tiny (chat fixture), both logging to
a real MLflow sqlite store; and its errors (no model, bad ratings, unreachable tracking server)."""

from __future__ import annotations

import json
import logging
import shutil
import socket
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_t5ja, seed_mlflow_db
from finetune import Example
from finetune.chat import END, START, build_chat_prompt, is_answer_correct
from finetune.jglue import TASKS, is_jcqa_correct, is_jnli_correct, is_jsquad_correct
from test_causal_export import CONVERSATIONS
from test_finetune_livedoor import GENRES, write_tarball

NEKO = ROOT / "data_prep" / "samples" / "neko.txt"
STEPS = 6  # the job's train.steps: the MLflow step of the eval figures
# Every figure the issue names, as printed in the table.
SERVING_ROWS = ("pass_at_1", "requests_per_s", "latency_mean_ms", "latency_p50_ms", "latency_p95_ms",
                "error_rate", "memory_peak_mib", "memory_measure", "batch_size")
CLASSIFICATION_ROWS = ("macro_precision", "macro_recall", "macro_f1", "accuracy")


# ---- pure logic -------------------------------------------------------------------------------

def test_jglue_pass_at_1_predicates_by_hand():
    squad = Example("q", "", "東京", references=("東京", "東京都"))
    assert is_jsquad_correct(squad, " 東京都 ")
    assert is_jsquad_correct(squad, "東京.")  # SQuAD's normalisation drops ASCII punctuation
    assert not is_jsquad_correct(squad, "京都")
    nli = Example("n", "", "entailment", label="entailment")
    assert is_jnli_correct(nli, " entailment\n") and not is_jnli_correct(nli, "neutral")
    choices = ("猫", "犬", "猫", "鳥", "魚")
    assert is_jcqa_correct(Example("c", "", "犬", label=1, references=choices), "犬")
    # "猫" names two choices: no answer, as the task's accuracy counts it
    assert not is_jcqa_correct(Example("c", "", "猫", label=0, references=choices), "猫")
    assert TASKS["jsts"].is_correct is None  # a graded score: no right answer


def test_livedoor_pass_at_1_is_its_accuracy(tmp_path):
    from finetune.livedoor import parse_predictions
    from finetune.metrics import get_accuracy
    from finetune.tasks import LivedoorTaskConfig, load_task
    from trainer.evaluate import get_pass_at_1, mark_correct

    task = load_task(LivedoorTaskConfig(name="livedoor", path=str(write_tarball(tmp_path / "ldcc.tar.gz"))))
    examples = task.splits["test"][:4]  # targets are genre indices "0".."2"
    labels = {e.label: e.target for e in task.splits["train"]}
    predictions = [examples[0].target, f" {examples[1].target}\n", "", "9"]  # right, right, empty, no label
    records = [{"id": e.id, "prediction": p, "error": None} for e, p in zip(examples, predictions)]
    mark_correct(records, examples, task.is_correct)
    assert [r["correct"] for r in records] == [True, True, False, False]
    assert get_pass_at_1(records) == 0.5
    # The classification report's accuracy asks the same question.
    assert get_accuracy([e.label for e in examples], parse_predictions(predictions, labels)) == 0.5


def encode_chars(text: str) -> list[int]:
    """One id per character, the turn markers one id each (a stand-in tokenizer)."""
    ids, i = [], 0
    while i < len(text):
        marker = next((m for m in (START, END) if text.startswith(m, i)), None)
        ids.append({START: 3, END: 4}[marker] if marker else 10 + ord(text[i]) % 1000)
        i += len(marker) if marker else 1
    return ids


def test_chat_prompt_asks_for_the_last_model_turn():
    messages = CONVERSATIONS[1]  # user, model, user, model
    prompt = build_chat_prompt(messages, encode_chars, bos_id=2, max_tokens=1000)
    assert prompt.reference == "薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。"
    assert prompt.text == (f"{START}user\nどこで生れましたか。{END}\n{START}model\nとんと見当がつかぬ。{END}\n"
                           f"{START}user\n何を覚えていますか。{END}\n{START}model\n")
    assert prompt.input_ids == [2, *encode_chars(prompt.text)] and prompt.num_cut_tokens == 0
    # Too long: <bos> and the last tokens stay (the question being answered is at the end).
    cut = build_chat_prompt(messages, encode_chars, bos_id=2, max_tokens=10)
    assert cut.input_ids == [2, *encode_chars(prompt.text)[-9:]]
    assert cut.num_cut_tokens == len(prompt.input_ids) - 10
    system = build_chat_prompt(CONVERSATIONS[0], encode_chars, bos_id=None, max_tokens=1000)
    assert system.text.startswith(f"{START}user\nあなたは丁寧な案内係です。\n\n猫の名前は?")  # folded in
    assert system.reference == "名前はまだ無い。"


def test_chat_answer_is_correct_by_normalised_exact_match():
    example = Example("c", "", "晴れです。")
    assert is_answer_correct(example, " 晴れです。\n") and not is_answer_correct(example, "晴れです")
    assert is_answer_correct(Example("c", "", "Yes, the cat."), "yes  cat")  # case, punctuation, articles


def test_ratings_mean_count_and_every_bad_row(tmp_path, caplog):
    from trainer.evaluate import EvalDataError, get_rating_metrics, read_ratings

    good = tmp_path / "good.csv"
    good.write_text("request_id,rating\na,5\nb,2\nstranger,1\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="trainer.evaluate"):
        metrics = get_rating_metrics(read_ratings(str(good)), ["a", "b", "c"])
    assert metrics == {"satisfaction/mean_rating": 3.5, "satisfaction/num_ratings": 2,
                       "satisfaction/num_unknown_ids": 1}
    assert "stranger" in caplog.text
    with pytest.raises(EvalDataError, match="'a'"):
        get_rating_metrics({"x": 3}, ["a"])  # none of this evaluation's requests
    bad = tmp_path / "bad.csv"
    bad.write_text("request_id,rating\na,5\nb,6\nc,x\na,1\n,3\n", encoding="utf-8")
    with pytest.raises(EvalDataError) as err:
        read_ratings(str(bad))
    for line, reason in ((3, "outside 1..5"), (4, "not an integer"), (5, "duplicate"), (6, "missing request_id")):
        assert f"bad.csv:{line}: " in str(err.value) and reason in str(err.value)


# ---- the command, end to end ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small T5-layout tokenizer trained as data prep does (test_finetune_seq2seq's)."""
    from data_prep.config import TokenizerConfig
    from data_prep.tokenizer import export_hf_tokenizer, train_sentencepiece

    out = tmp_path_factory.mktemp("eval-tokenizer")
    lines = [line for line in NEKO.read_text(encoding="utf-8").split("\n")[:1500] if line.strip()]
    train_sentencepiece(lines, TokenizerConfig(vocab_size=2000, character_coverage=0.98), out / "spiece.model")
    export_hf_tokenizer(out / "spiece.model", 100, out)
    return out


def save_random_model(preset: str, tokenizer_dir: Path, out: Path) -> Path:
    """A randomly initialised preset saved as `t5ja export` saves one: weights + tokenizer files."""
    import torch

    from data_prep.tokenizer import load_tokenizer
    from trainer.model import ModelConfig, build_model

    torch.manual_seed(0)
    build_model(ModelConfig(preset=preset), len(load_tokenizer(tokenizer_dir))).save_pretrained(out)
    for path in tokenizer_dir.iterdir():
        shutil.copy2(path, out / path.name)
    return out


def write_job(out: Path, job: dict) -> Path:
    path = out / f"{job['name']}.yaml"
    path.write_text(yaml.safe_dump(job, allow_unicode=True), encoding="utf-8")
    return path


def table_rows(stdout: str) -> dict[str, str]:
    """The printed table (after its header and rule): metric -> value text."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == ["metric", "value"])
    return dict(line.split() for line in lines[start + 2:] if line.strip())


@pytest.fixture(scope="module")
def livedoor_run(tmp_path_factory, tokenizer_dir, mlflow_db):
    """A seq2seq job whose run directory holds a random t5-tiny as RUN_DIR/export and the id of
    its training run in MLflow, as `t5ja train` leaves them."""
    from mlflow.tracking import MlflowClient

    from trainer.metrics import get_experiment_id

    out = tmp_path_factory.mktemp("eval-livedoor")
    seed_mlflow_db(mlflow_db, out)
    tarball = write_tarball(out / "ldcc.tar.gz", per_genre=12)
    model_dir = save_random_model("t5-tiny", tokenizer_dir, out / "init")
    job = write_job(out, {
        "name": "ft", "output_dir": str(out), "model": {"preset": "t5-tiny", "init_from": str(model_dir)},
        "objective": {"name": "seq2seq", "input_length": 48, "target_length": 4},
        "task": {"name": "livedoor", "path": str(tarball)}, "train": {"steps": STEPS}, "eval": {"batch_size": 3}})
    run_dir = out / "ft"
    shutil.copytree(model_dir, run_dir / "export")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    training_run = client.create_run(get_experiment_id(client, "t5ja", uri), run_name="ft")
    (run_dir / "mlflow_run_id").write_text(training_run.info.run_id + "\n")
    return job, run_dir, tarball, uri


def test_seq2seq_eval_prints_writes_and_logs_every_metric(livedoor_run, tmp_path):
    from mlflow.tracking import MlflowClient

    from finetune.tasks import LivedoorTaskConfig, load_task

    job, run_dir, tarball, uri = livedoor_run
    test_ids = [e.id for e in load_task(LivedoorTaskConfig(name="livedoor", path=str(tarball))).splits["test"]]
    ratings = tmp_path / "ratings.csv"  # three of this split's requests, and one of something else
    ratings.write_text(f"request_id,rating\n{test_ids[0]},5\n{test_ids[1]},4\n{test_ids[2]},2\nother-1,1\n")
    result = run_t5ja("eval", str(job), "--batch-size", "2", "--ratings", str(ratings), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table_rows(result.stdout)
    for name in (*CLASSIFICATION_ROWS, *SERVING_ROWS, "satisfaction/mean_rating", "satisfaction/num_ratings"):
        assert name in rows, name
    assert rows["satisfaction/mean_rating"] == "3.6667" and rows["satisfaction/num_ratings"] == "3"
    assert rows["satisfaction/num_unknown_ids"] == "1" and "other-1" in result.stderr
    assert rows["batch_size"] == "2" and rows["memory_measure"] == "cpu_peak_rss"

    # The files, in the seed's layout, beside (not over) the training-time evaluation's names.
    eval_dir = run_dir / "eval"
    report = (eval_dir / "test_eval_report.txt").read_text()
    assert report.split("\n")[0].split() == ["precision", "recall", "f1-score", "support"]
    for row in (*GENRES, "accuracy", "macro avg", "weighted avg"):
        assert f"{row} " in report, row
    assert (eval_dir / "test_eval_confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (eval_dir / "test_eval_predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == test_ids and all(isinstance(r["correct"], bool) for r in records)
    summary = json.loads((eval_dir / "test_eval.json").read_text())
    metrics, settings = summary["metrics"], summary["settings"]
    assert metrics["pass_at_1"] == pytest.approx(sum(r["correct"] for r in records) / len(records))
    assert metrics["pass_at_1"] == pytest.approx(metrics["accuracy"])  # classification: the same question
    assert metrics["num_requests"] == len(test_ids) and metrics["error_rate"] == pytest.approx(
        sum(not r["prediction"].strip() or r["error"] is not None for r in records) / len(records))
    assert metrics["requests_per_s"] > 0 and metrics["latency_p50_ms"] > 0 and metrics["memory_peak_mib"] > 50
    assert settings["model"] == str(run_dir / "export") and settings["split"] == "test"
    assert (settings["batch_size"], settings["max_new_tokens"]) == (2, 4)  # --batch-size; objective.target_length
    assert float(rows["macro_f1"]) == pytest.approx(metrics["macro_f1"], abs=1e-4)

    # MLflow: into the training run of RUN_DIR/mlflow_run_id, at the job's last step.
    client = MlflowClient(tracking_uri=uri)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    for name in ("macro_precision", "macro_recall", "macro_f1", "pass_at_1", "requests_per_s", "latency_p95_ms",
                 "error_rate", "memory_peak_mib", "satisfaction/mean_rating", "satisfaction/num_ratings"):
        assert run.data.metrics[f"eval/{name}"] == pytest.approx(metrics[name]), name
    assert [m.step for m in client.get_metric_history(run_id, "eval/pass_at_1")] == [STEPS]
    assert run.data.tags["t5ja_eval.split"] == "test" and run.data.tags["t5ja_eval.memory_measure"] == "cpu_peak_rss"
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"eval/test_eval.json", "eval/test_eval_predictions.jsonl", "eval/test_eval_report.txt",
            "eval/test_eval_confusion_matrix.png"} <= artifacts
    assert f"logged to run {run_id}" in result.stdout


def test_causal_lm_eval_scores_the_last_turn_into_a_new_mlflow_run(tmp_path, tokenizer_dir, mlflow_db):
    from mlflow.tracking import MlflowClient

    seed_mlflow_db(mlflow_db, tmp_path)
    model_dir = save_random_model("gemma-tiny", tokenizer_dir, tmp_path / "gemma")
    for name, conversations in (("train.jsonl", CONVERSATIONS), ("eval.jsonl", CONVERSATIONS[:3])):
        (tmp_path / name).write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n"
                                             for c in conversations), encoding="utf-8")
    job = write_job(tmp_path, {
        "name": "sft", "output_dir": str(tmp_path), "model": {"preset": "gemma-tiny", "init_from": str(model_dir)},
        "objective": {"name": "causal_lm", "max_length": 256},
        "task": {"name": "chat", "train_file": str(tmp_path / "train.jsonl"),
                 "eval_file": str(tmp_path / "eval.jsonl")},
        "train": {"steps": STEPS}, "eval": {"split": "validation", "batch_size": 2, "max_new_tokens": 6}})
    result = run_t5ja("eval", str(job), "--model", str(model_dir), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table_rows(result.stdout)
    for name in ("loss", "perplexity", "num_windows", *SERVING_ROWS):
        assert name in rows, name
    summary = json.loads((tmp_path / "sft" / "eval" / "validation_eval.json").read_text())
    metrics = summary["metrics"]
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    assert metrics["num_requests"] == 3 and summary["settings"]["model"] == str(model_dir)
    assert metrics["num_cut_prompts"] == 0 and metrics["num_windows"] >= 1
    records = [json.loads(line) for line in
               (tmp_path / "sft" / "eval" / "validation_eval_predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["conversation-0", "conversation-1", "conversation-2"]
    assert [r["target"] for r in records] == [c[-1]["content"] for c in CONVERSATIONS[:3]]
    assert metrics["pass_at_1"] == sum(r["correct"] for r in records) / 3  # random weights: surely 0, but counted

    # No training run recorded: a new run named after the job, pointing at the run directory.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("t5ja").experiment_id])
    assert run.info.run_name == "sft" and run.info.status == "FINISHED"
    assert run.data.tags["t5ja_eval.run_dir"] == str(tmp_path / "sft")
    assert run.data.metrics["eval/loss"] == pytest.approx(metrics["loss"])
    assert {"eval/validation_eval.json", "eval/validation_eval_predictions.jsonl"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert not (tmp_path / "sft" / "mlflow_run_id").exists()  # a later `t5ja train` must not continue it


# ---- errors ---------------------------------------------------------------------------------

def get_free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_tracking_server_still_prints_and_writes(livedoor_run, capsys, monkeypatch):
    from launcher.cli import EXIT_NOT_LOGGED, main

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    job, run_dir, _, _ = livedoor_run
    uri = f"http://127.0.0.1:{get_free_port()}"  # nothing listens there
    code = main(["eval", str(job), f"mlflow.tracking_uri={uri}", "--split", "validation", "--limit", "2"])
    out = capsys.readouterr()
    assert code == EXIT_NOT_LOGGED == 5
    assert f"MLflow: NOT logged ({uri}" in out.err and "pass_at_1" in table_rows(out.out)
    metrics = json.loads((run_dir / "eval" / "validation_eval.json").read_text())["metrics"]
    assert metrics["num_requests"] == 2


def test_missing_model_bad_ratings_and_span_corruption_are_clear_errors(livedoor_run, tmp_path, capsys):
    from launcher.cli import EXIT_CONFIG, EXIT_DATA, main

    job, run_dir, _, _ = livedoor_run
    missing = tmp_path / "runs"
    assert main(["eval", str(job), f"output_dir={missing}"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"--model: {missing / 'ft' / 'export'}: no such model directory" in err and "pass --model PATH" in err

    bad = tmp_path / "bad.csv"
    bad.write_text("request_id,rating\na,0\nb,five\n", encoding="utf-8")
    assert main(["eval", str(job), "--ratings", str(bad)]) == EXIT_DATA
    err = capsys.readouterr().err
    assert "bad.csv:2: rating 0 outside 1..5" in err and "bad.csv:3: rating 'five' is not an integer" in err
    assert main(["eval", str(job), "--ratings", str(tmp_path / "none.csv")]) == EXIT_CONFIG
    assert "--ratings: " in capsys.readouterr().err

    quickstart = ROOT / "configs" / "quickstart.yaml"
    assert main(["eval", str(quickstart), f"output_dir={tmp_path}"]) == EXIT_CONFIG
    assert "objective.name: span_corruption has no task" in capsys.readouterr().err
