"""`t5ja train` with objective seq2seq on a fixture-sized livedoor task: real torchrun, 2 ranks,
DeepSpeed ZeRO-3 on CPU, initialised from a Hugging Face model directory, then evaluated by
greedy generation: predictions, the classification report, MLflow metrics and artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_t5ja, seed_mlflow_db
from test_finetune_livedoor import GENRES, write_tarball

pytestmark = pytest.mark.multiproc
STEPS = 6


def write_job(out: Path, init_from: Path, tarball: Path) -> Path:
    job = {
        "name": "ft", "output_dir": str(out),
        "model": {"preset": "t5-tiny", "init_from": str(init_from)},
        "objective": {"name": "seq2seq", "input_length": 48, "target_length": 4},
        "task": {"name": "livedoor", "path": str(tarball)},
        "train": {"steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2, "lr": 3e-3, "precision": "fp32",
                  "log_every": 2, "warmup_steps": 0},
        "eval": {"batch_size": 3},
        "deepspeed": {"config": "zero3"},
        "checkpoint": {"every_steps": 0},
        "telemetry": {"busbw_probe_mb": 1},
        "launcher": {"nproc_per_node": 2},
    }
    path = out / "ft.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory, tiny_hf_model, mlflow_db):
    out = tmp_path_factory.mktemp("finetune")
    seed_mlflow_db(mlflow_db, out)
    tarball = write_tarball(out / "ldcc.tar.gz", per_genre=12)
    result = run_t5ja("train", str(write_job(out, tiny_hf_model, tarball)))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, out / "ft", tarball


def test_predictions_cover_the_test_split(finetune_run, tiny_hf_model):
    from finetune.tasks import LivedoorTaskConfig, load_task

    _, run_dir, tarball = finetune_run
    test = load_task(LivedoorTaskConfig(name="livedoor", path=str(tarball))).splits["test"]
    records = [json.loads(line) for line in (run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [e.id for e in test] and len(records) == 5
    assert all(r["error"] is None and r["target"] in ("0", "1", "2") for r in records)
    # Both ranks generated, each for its shard (examples 0, 2, 4 and 1, 3), gathered in order.
    for rank, count in ((0, 3), (1, 2)):
        log = (run_dir / "logs" / f"rank_{rank}.log").read_text()
        assert f"evaluation: generating for {count} of the 5 examples of split test" in log
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run"]["tokenizer_dir"] == str(tiny_hf_model) and config["run"]["tokens_dir"] is None
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in losses if "train/loss" in m] == [2, 4, 6]


def test_report_has_sklearn_layout_and_png(finetune_run):
    _, run_dir, _ = finetune_run
    report = (run_dir / "eval" / "test_report.txt").read_text()
    assert report.split("\n")[0].split() == ["precision", "recall", "f1-score", "support"]
    for row in (*GENRES, "accuracy", "macro avg", "weighted avg"):
        assert f"{row} " in report, row
    assert (run_dir / "eval" / "test_confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((run_dir / "eval" / "test_metrics.json").read_text())
    assert metrics["num_examples"] == 5 and 0 <= metrics["accuracy"] <= 1 and metrics["num_errors"] == 0


def test_mlflow_has_eval_metrics_and_artifacts(finetune_run):
    from mlflow.tracking import MlflowClient

    out, run_dir, _ = finetune_run
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED"
    expected = json.loads((run_dir / "eval" / "test_metrics.json").read_text())
    for name in ("accuracy", "macro_f1", "weighted_f1", "num_invalid", "num_examples"):
        assert run.data.metrics[f"eval/{name}"] == pytest.approx(expected[name]), name
    assert run.data.params["objective.name"] == "seq2seq" and run.data.params["task.name"] == "livedoor"
    artifacts = {a.path for folder in ("eval", "predictions", "export") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"eval/test_report.txt", "eval/test_confusion_matrix.png", "eval/test_metrics.json",
            "predictions/test.jsonl", "export/model.safetensors", "export/spiece.model"} <= artifacts


def test_init_from_is_loaded_partitioned_under_zero3(finetune_run, tiny_hf_model):
    """Each rank read only its shard of model.init_from (deepspeed.zero.Init), and the run's
    description still counts every parameter (a partitioned one's numel is 0)."""
    from mlflow.tracking import MlflowClient
    from transformers import T5ForConditionalGeneration

    out, run_dir, _ = finetune_run
    log = (run_dir / "logs" / "rank_0.log").read_text()
    model = T5ForConditionalGeneration.from_pretrained(tiny_hf_model)
    num_tensors = len(list(model.parameters()))
    assert (f"loaded model.init_from {tiny_hf_model} partitioned across the ranks (ZeRO-3, deepspeed.zero.Init): "
            f"{num_tensors} of {num_tensors} parameter tensors partitioned") in log
    num_params = sum(p.numel() for p in model.parameters())
    run = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}").get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert f"({num_params / 1e6:.1f}M params)" in run.data.tags["mlflow.note.content"]


def test_export_loads_and_generates(finetune_run):
    import torch
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    _, run_dir, _ = finetune_run
    model = T5ForConditionalGeneration.from_pretrained(run_dir / "export").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "export")
    verify = torch.load(run_dir / "export" / "verify_batch.pt")
    assert "attention_mask" in verify  # the seq2seq batch, padding masked
    with torch.no_grad():
        logits = model(**{k: v for k, v in verify.items() if k != "logits"}).logits
    assert torch.allclose(logits, verify["logits"], atol=1e-4)
    ids = tokenizer("吾輩は猫である", return_tensors="pt").input_ids
    assert model.generate(input_ids=ids, max_new_tokens=3).shape[0] == 1
