"""The fine-tuning job schema (seq2seq, causal_lm): the objective and task unions on `name`,
model.init_from, eval, and that every problem is reported at once with its YAML path (no
torchrun, no model)."""

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
    for name in ("ldcc.tar.gz", "train.json", "valid.json", "chat.jsonl"):
        (tmp_path / name).write_bytes(b"")
    return {"model": model, "tarball": tmp_path / "ldcc.tar.gz", "train": tmp_path / "train.json",
            "valid": tmp_path / "valid.json", "chat": tmp_path / "chat.jsonl"}


def seq2seq_job(files: dict[str, Path], **sections) -> dict:
    job = {"name": "ft", "output_dir": "runs",
           "model": {"preset": "t5-tiny", "init_from": str(files["model"])},
           "objective": {"name": "seq2seq", "input_length": 64, "target_length": 4},
           "task": {"name": "livedoor", "path": str(files["tarball"])},
           "train": {"steps": 10, "global_batch_size": 8, "micro_batch_size": 4},
           "launcher": {"nproc_per_node": 2}}
    job.update(sections)
    return {k: v for k, v in job.items() if v is not None}


def causal_lm_job(files: dict[str, Path], **sections) -> dict:
    defaults = {"model": {"preset": "gemma-tiny", "init_from": str(files["model"])},
                "objective": {"name": "causal_lm", "max_length": 256},
                "task": {"name": "chat", "train_file": str(files["chat"])}}
    return seq2seq_job(files, **{**defaults, **sections})


def load(tmp_path: Path, job: dict, overrides: list[str] = ()):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return load_job(path, list(overrides), base_dir=tmp_path)


def problems(tmp_path: Path, job: dict, overrides: list[str] = ()) -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, job, overrides)
    return dict(err.value.problems)


def heavy_modules_after_planning(job: Path) -> str:
    """In a fresh interpreter: load, plan and write the run of `job`, then list the torch,
    DeepSpeed and transformers modules that got imported (the launcher needs none)."""
    code = ("import sys; from launcher.job import load_job; from launcher.run import plan_run, write_run; "
            f"write_run(plan_run(load_job({str(job)!r}))); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'transformers')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


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
    assert "span_corruption (default), seq2seq or causal_lm" in problems(tmp_path, seq2seq_job(files), ["objective.name=mlm"])["objective"]


def test_seq2seq_without_init_from_needs_a_tokenizer(tmp_path, files):
    job = seq2seq_job(files)
    del job["model"]["init_from"]
    assert "needs a tokenizer" in problems(tmp_path, job)["model.init_from"]
    assert load(tmp_path, job, [f"tokenizer.path={files['model']}"]).model.init_from is None


def test_planning_a_seq2seq_run_does_not_import_torch(tmp_path, files):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(seq2seq_job(files, output_dir=str(tmp_path / "runs"))))
    assert heavy_modules_after_planning(job) == "[]"
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


def test_causal_lm_job_reads_a_chat_task(tmp_path, files):
    job = load(tmp_path, causal_lm_job(files))
    assert job.objective.name == "causal_lm" and job.objective.pack and job.objective.overlong == "drop"
    assert job.task.name == "chat" and job.task.eval_file is None and job.data is None
    job = load(tmp_path, causal_lm_job(files), [f"task.eval_file={files['chat']}", "objective.pack=false"])
    assert job.task.eval_file == str(files["chat"]) and not job.objective.pack
    run = plan_run(job).config["run"]
    assert run["tokens_dir"] is None and run["tokenizer_dir"] == str(files["model"])
    sft = load(tmp_path, causal_lm_job(files, task={"name": "livedoor_sft", "path": str(files["tarball"]),
                                                    "tasks": ["genre"]}))
    assert sft.task.tasks == ["genre"] and sft.task.seed == 1234 and sft.task.max_article_chars == 1000


def test_causal_lm_problems_all_at_once(tmp_path, files):
    job = causal_lm_job(files, model={"preset": "t5-tiny", "init_from": str(files["model"])},
                        task={"name": "chat", "train_file": str(tmp_path / "none.jsonl"),
                              "eval_file": str(tmp_path / "nor.jsonl")})
    job["objective"]["input_length"] = 64  # a seq2seq key
    found = problems(tmp_path, job)
    assert set(found) == {"model.preset", "objective.input_length", "task.train_file", "task.eval_file"}
    assert "t5-tiny is not a causal LM; objective causal_lm needs one of gemma-2b, gemma-7b, gemma-tiny" \
        in found["model.preset"]
    assert "no such file" in found["task.train_file"] and "no such file" in found["task.eval_file"]


def test_the_task_must_suit_the_objective(tmp_path, files):
    found = problems(tmp_path, causal_lm_job(files, task={"name": "livedoor", "path": str(files["tarball"])}))
    assert found == {"task.name": "livedoor is a task of objective seq2seq; objective causal_lm reads chat or "
                                  "livedoor_sft"}
    found = problems(tmp_path, seq2seq_job(files, task={"name": "chat", "train_file": str(files["chat"])}))
    assert found == {"task.name": "chat is a task of objective causal_lm; objective seq2seq reads livedoor or jglue"}
    found = problems(tmp_path, causal_lm_job(files, task=None))
    assert "required key is missing" in found["task"] and "chat or livedoor_sft" in found["task"]
    assert "livedoor_sft (causal_lm)" in problems(tmp_path, causal_lm_job(files, task={"path": "x"}))["task"]


def test_causal_presets_are_refused_by_the_t5_objectives(tmp_path, files):
    found = problems(tmp_path, seq2seq_job(files), ["model.preset=gemma-tiny"])
    assert set(found) == {"model.preset"} and "gemma-tiny is a causal LM; objective seq2seq" in found["model.preset"]
    found = problems(tmp_path, causal_lm_job(files), ["objective.name=span_corruption"])
    assert "gemma-tiny is a causal LM; objective span_corruption" in found["model.preset"]


def test_livedoor_sft_split_fractions_are_checked(tmp_path, files):
    task = {"name": "livedoor_sft", "path": str(files["tarball"]), "test_fraction": 0.5}
    found = problems(tmp_path, causal_lm_job(files, task=task))
    assert set(found) == {"task"} and "must be 1" in found["task"]
    found = problems(tmp_path, causal_lm_job(files, task={**task, "test_fraction": 0.15, "tasks": ["summary"]}))
    assert set(found) == {"task.tasks[0]"}


def test_planning_a_causal_lm_run_does_not_import_torch(tmp_path, files):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(causal_lm_job(files, output_dir=str(tmp_path / "runs"))))
    assert heavy_modules_after_planning(job) == "[]"
    config = json.loads((tmp_path / "runs" / "ft" / "config.json").read_text())
    assert config["objective"] == {"name": "causal_lm", "max_length": 256, "pack": True, "overlong": "drop"}
    assert config["task"]["eval_file"] is None
