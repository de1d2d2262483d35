"""The seq2seq job schema: the objective and task unions on `name`, model.init_from, eval, and
that every problem is reported at once with its YAML path (no torchrun, no model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.job import ConfigError, load_job
from launcher.run import plan_run

from conftest import ROOT


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """A model directory that passes the up-front check (config.json + a tokenizer file) and task files."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "spiece.model").write_bytes(b"")
    for name in ("ldcc.tar.gz", "train.json", "valid.json"):
        (tmp_path / name).write_bytes(b"")
    return {"model": model, "tarball": tmp_path / "ldcc.tar.gz", "train": tmp_path / "train.json",
            "valid": tmp_path / "valid.json"}


def seq2seq_job(files: dict[str, Path], **sections) -> dict:
    job = {"name": "ft", "output_dir": "runs",
           "model": {"preset": "t5-tiny", "init_from": str(files["model"])},
           "objective": {"name": "seq2seq", "input_length": 64, "target_length": 4},
           "task": {"name": "livedoor", "path": str(files["tarball"])},
           "train": {"steps": 10, "global_batch_size": 8, "micro_batch_size": 4},
           "launcher": {"nproc_per_node": 2}}
    job.update(sections)
    return {k: v for k, v in job.items() if v is not None}


def load(tmp_path: Path, job: dict, overrides: list[str] = ()):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return load_job(path, list(overrides), base_dir=tmp_path)


def problems(tmp_path: Path, job: dict, overrides: list[str] = ()) -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, job, overrides)
    return dict(err.value.problems)


def test_seq2seq_job_needs_no_data_prep(tmp_path, files):
    job = load(tmp_path, seq2seq_job(files))
    assert job.objective.name == "seq2seq" and job.task.name == "livedoor" and job.data is None
    assert job.eval.split == "test" and job.eval.batch_size == 32 and job.eval.max_new_tokens is None
    run = plan_run(job).config["run"]
    assert run["tokens_dir"] is None and run["tokenizer_dir"] == str(files["model"])


def test_existing_job_files_default_to_span_corruption():
    job = load_job(ROOT / "configs/quickstart.yaml", base_dir=ROOT)
    assert job.objective.name == "span_corruption" and job.task is None
    assert job.pack_length == job.objective.expanded_length


def test_every_problem_at_once_with_yaml_paths(tmp_path, files):
    job = seq2seq_job(files, task=None, eval={"split": "dev"})
    job["objective"]["noise_density"] = 0.15  # a span-corruption key in the seq2seq objective
    job["model"]["init_from"] = str(tmp_path / "nope")
    found = problems(tmp_path, job)
    assert set(found) == {"objective.noise_density", "task", "model.init_from", "eval.split"}
    assert "required key is missing" in found["task"] and "no such model directory" in found["model.init_from"]


def test_init_from_needs_config_and_tokenizer(tmp_path, files):
    (files["model"] / "spiece.model").unlink()
    (files["model"] / "config.json").unlink()
    found = problems(tmp_path, seq2seq_job(files))
    assert "no config.json and no a tokenizer" in found["model.init_from"]


def test_task_union_on_name(tmp_path, files):
    assert "livedoor or jglue" in problems(tmp_path, seq2seq_job(files, task={"path": "x"}))["task"]
    found = problems(tmp_path, seq2seq_job(files, task={"name": "livedoor", "path": str(tmp_path / "none.tgz"),
                                                        "typo": 1}))
    assert set(found) == {"task.typo", "task.path"} and "no such file" in found["task.path"]
    jglue = {"name": "jglue", "task": "jnli", "train_file": str(files["train"]), "eval_file": str(files["valid"])}
    assert load(tmp_path, seq2seq_job(files, task=jglue)).task.task == "jnli"
    found = problems(tmp_path, seq2seq_job(files, task={**jglue, "eval_file": "missing.json"}))
    assert set(found) == {"task.eval_file"}


def test_objective_name_and_sections_agree(tmp_path, files):
    found = problems(tmp_path, seq2seq_job(files), ["objective.name=span_corruption"])
    # span corruption: no task allowed, data required; its own keys are checked too
    assert set(found) == {"task", "data", "objective.target_length"}
    assert "span_corruption (default) or seq2seq" in problems(tmp_path, seq2seq_job(files), ["objective.name=mlm"])["objective"]


def test_seq2seq_without_init_from_needs_a_tokenizer(tmp_path, files):
    job = seq2seq_job(files)
    del job["model"]["init_from"]
    assert "needs a tokenizer" in problems(tmp_path, job)["model.init_from"]
    assert load(tmp_path, job, [f"tokenizer.path={files['model']}"]).model.init_from is None


def test_planning_a_seq2seq_run_does_not_import_torch(tmp_path, files):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(seq2seq_job(files, output_dir=str(tmp_path / "runs"))))
    code = ("import sys; from launcher.job import load_job; from launcher.run import plan_run, write_run; "
            f"write_run(plan_run(load_job({str(job)!r}))); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'transformers')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
    config = json.loads((tmp_path / "runs" / "ft" / "config.json").read_text())
    assert config["objective"]["name"] == "seq2seq" and config["task"]["path"] == str(files["tarball"])


def test_jglue_task_splits_and_evaluator(tmp_path):
    from finetune.tasks import JGLUETaskConfig, load_task

    records = [{"sentence_pair_id": str(i), "sentence1": f"文{i}", "sentence2": "文", "label": label}
               for i, label in enumerate(["entailment", "neutral", "contradiction"])]
    for name in ("train.json", "valid.json"):
        (tmp_path / name).write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    task = load_task(JGLUETaskConfig(name="jglue", task="jnli", train_file=str(tmp_path / "train.json"),
                                     eval_file=str(tmp_path / "valid.json")))
    assert len(task.splits["train"]) == 3 and task.splits["test"] == task.splits["validation"]
    result = task.evaluate(task.splits["test"], ["entailment", "neutral", "x"], tmp_path, "test")
    assert result.metrics == {"accuracy": pytest.approx(2 / 3), "num_invalid": 1.0}
    assert (tmp_path / "test_report.txt").read_text().startswith("jnli (3 examples)")


def test_livedoor_metrics_are_flat_mlflow_names():
    from finetune.tasks import get_classification_metrics

    report = {"a": {"precision": 1.0, "recall": 0.5, "f1-score": 0.6, "support": 2},
              "<invalid>": {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0},
              "accuracy": 0.5, "num_invalid": 1,
              "macro avg": {"precision": 0.5, "recall": 0.25, "f1-score": 0.3, "support": 2},
              "weighted avg": {"precision": 1.0, "recall": 0.5, "f1-score": 0.6, "support": 2}}
    assert get_classification_metrics(report) == {
        "accuracy": 0.5, "num_invalid": 1, "macro_precision": 0.5, "macro_recall": 0.25, "macro_f1": 0.3,
        "weighted_precision": 1.0, "weighted_recall": 0.5, "weighted_f1": 0.6, "f1/a": 0.6}


def test_prep_refuses_a_job_without_data_and_says_why(tmp_path, files):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(seq2seq_job(files)))
    result = subprocess.run([sys.executable, "-m", "launcher.cli", "prep", str(path)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "data: `t5ja prep` prepares the corpora of a `data` section" in result.stderr
    assert "Traceback" not in result.stderr
