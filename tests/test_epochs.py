"""`train.epochs`: validated against `train.steps`, resolved to steps over the data's samples,
kept across resumes; and one real 2-rank run that trains by epochs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError

from launcher.job import ConfigError, load_job
from trainer.checkpoint import TrainState
from trainer.config import DEFAULT_STEPS, TrainConfig, get_epoch_steps
from trainer.optim import lr_factor
from trainer.train import get_num_steps

from conftest import ROOT, run_t5ja, seed_mlflow_db, train_args

QUICKSTART = ROOT / "configs/quickstart.yaml"  # sets train.steps: 300


# ---- validation -------------------------------------------------------------------------

def test_steps_and_epochs_together_are_one_error_naming_both():
    with pytest.raises(ConfigError) as err:
        load_job(QUICKSTART, ["train.epochs=2"], base_dir=ROOT)
    [(path, msg)] = err.value.problems
    assert path == "train.epochs"
    assert "train.steps (300) and train.epochs (2) are both set" in msg and "train.steps=null" in msg
    with pytest.raises(ValidationError, match="are both set"):
        TrainConfig(steps=10, epochs=1.5)


def test_either_length_alone_and_the_default_when_neither():
    assert (TrainConfig().steps, TrainConfig().epochs) == (DEFAULT_STEPS, None)
    assert (TrainConfig(steps=7).steps, TrainConfig(steps=7).epochs) == (7, None)
    assert (TrainConfig(epochs=2.5).steps, TrainConfig(epochs=2.5).epochs) == (None, 2.5)
    # The launcher writes the validated job to config.json, which the worker validates again.
    for cfg in (TrainConfig(), TrainConfig(epochs=4)):
        assert TrainConfig.model_validate(json.loads(cfg.model_dump_json())) == cfg
    # A job file's steps give way to epochs on the command line, and the reverse.
    job = load_job(QUICKSTART, ["train.epochs=2", "train.steps=null"], base_dir=ROOT)
    assert (job.train.steps, job.train.epochs) == (None, 2.0)


@pytest.mark.parametrize("epochs", ["0", "-1", ".nan", ".inf"])
def test_epochs_must_be_a_positive_number(epochs):
    with pytest.raises(ConfigError) as err:
        load_job(QUICKSTART, ["train.steps=null", f"train.epochs={epochs}"], base_dir=ROOT)
    assert [path for path, _ in err.value.problems] == ["train.epochs"]


def test_dry_run_says_the_length_in_epochs(tmp_path):
    result = run_t5ja("train", str(QUICKSTART), f"output_dir={tmp_path}", "train.steps=null", "train.epochs=1.5",
                      "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "# training length: 1.5 epochs (steps resolved at start: ceil(1.5 x training samples / 32))" in result.stdout
    assert '"epochs": 1.5' in result.stdout and '"steps": null' in result.stdout


# ---- resolution -------------------------------------------------------------------------

@pytest.mark.parametrize("epochs, num_samples, batch, steps", [
    (4, 5157, 8, 2579),  # configs/livedoor-t5.yaml: 2578.5 rounds up
    (3, 16, 16, 3),  # exact
    (3, 17, 16, 4),  # 3.19: the last, partial batch is a step
    (0.5, 100, 8, 7),  # a fractional epoch: 6.25
    (0.1, 80, 8, 1),  # 0.1 as written, not the float just above it (which would give 2)
    (2.5, 10, 5, 5),
])
def test_epoch_steps_are_the_ceiling_of_epochs_times_samples_over_the_batch(epochs, num_samples, batch, steps):
    assert get_epoch_steps(epochs, num_samples, batch) == steps


def test_epoch_steps_need_samples():
    with pytest.raises(ValueError, match="needs training samples"):
        get_epoch_steps(1, 0, 8)


def test_resume_keeps_the_resolved_count_unless_the_length_changed():
    cfg = TrainConfig(epochs=4, global_batch_size=8)
    assert get_num_steps(cfg, 5157) == 2579
    saved = TrainState(step=500, consumed_samples=4000, num_steps=2579, epochs=4.0)
    # The data grew since the checkpoint: the run still ends where it was going to.
    assert get_num_steps(cfg, 6000, saved) == 2579
    # Another train.epochs re-resolves over the data now, as another train.steps applies.
    assert get_num_steps(TrainConfig(epochs=2, global_batch_size=8), 6000, saved) == 1500
    assert get_num_steps(TrainConfig(steps=3000, global_batch_size=8), 6000, saved) == 3000
    # A checkpoint of a train.steps run, or one older than train.epochs, holds no epochs count.
    assert get_num_steps(cfg, 5157, TrainState(step=500, num_steps=1000)) == 2579
    assert get_num_steps(cfg, 5157, TrainState(**{"step": 500, "consumed_samples": 4000})) == 2579
    assert get_num_steps(TrainConfig(steps=40), 16) == 40


def test_lr_decays_to_its_floor_at_the_resolved_step():
    cfg = TrainConfig(epochs=3, global_batch_size=16, lr_decay="linear", min_lr_ratio=0.0)
    num_steps = get_epoch_steps(cfg.epochs, 16, cfg.global_batch_size)
    assert lr_factor(num_steps, cfg, num_steps) == 0.0
    assert lr_factor(1, cfg, num_steps) == pytest.approx(2 / 3)


def test_eval_logs_at_the_step_the_run_resolved(tmp_path):
    from trainer import checkpoint as ckpt
    from trainer.evaluate import get_final_step

    job = load_job(QUICKSTART, [f"output_dir={tmp_path}", "train.steps=null", "train.epochs=2"], base_dir=ROOT)
    assert job.train.steps is None and get_final_step(job.train.steps, job.run_dir) == 0  # not trained yet
    step_dir = ckpt.checkpoints_dir(job.run_dir) / ckpt.tag_for(12)
    step_dir.mkdir(parents=True)
    (step_dir / "train_state.json").write_text(json.dumps({"step": 12, "num_steps": 12, "epochs": 2.0}))
    (step_dir.parent / "latest").write_text(step_dir.name + "\n")
    assert get_final_step(job.train.steps, job.run_dir) == 12
    assert ckpt.read_latest_train_state(job.run_dir).num_steps == 12
    job = load_job(QUICKSTART, [f"output_dir={tmp_path}"], base_dir=ROOT)
    assert get_final_step(job.train.steps, job.run_dir) == 300


# ---- a real run -------------------------------------------------------------------------

@pytest.mark.multiproc
def test_two_rank_run_trains_for_the_resolved_epochs(tmp_path, tiny_data, mlflow_db):
    from mlflow.tracking import MlflowClient

    from data_prep import layout
    from trainer.data import TokenWindows
    from trainer.metrics import read_records

    num_samples = len(TokenWindows(layout.tokens_dir(tiny_data)))  # 16..18 windows
    steps = math.ceil(3 * num_samples / 16)
    seed_mlflow_db(mlflow_db, tmp_path)
    result = run_t5ja(*train_args(tmp_path, tiny_data, "zero2", "train.steps=null", "train.epochs=3",
                                  "train.micro_batch_size=8", "train.warmup_steps=0", "checkpoint.every_steps=2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "run"
    log = (run_dir / "logs" / "rank_0.log").read_text()
    assert f"train.epochs 3 = {steps} steps of 16 samples over {num_samples} samples" in log
    records = [r for r in read_records(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert records[-1]["train/epoch"] == pytest.approx(steps * 16 / num_samples)
    # every_steps=2 saves at 2 (the last step is saved once, by the end), keep_last=2 keeps both.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002", f"step_{steps:08d}"]
    last = run_dir / "checkpoints" / f"step_{steps:08d}"
    state = json.loads((last / "train_state.json").read_text())
    assert (state["step"], state["num_steps"], state["epochs"]) == (steps, steps, 3.0)
    # The engine's own schedule ended at the floor (cosine to lr x 0.1) at the resolved step,
    # not somewhere along the default 1000 steps.
    scheduler = torch.load(last / "mp_rank_00_model_states.pt", weights_only=False)["lr_scheduler"]
    assert scheduler["_last_lr"] == pytest.approx([1e-2 * 0.1] * 2)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("t5ja").experiment_id])
    assert (run.data.params["train.steps"], run.data.params["train.epochs"]) == (str(steps), "3.0")
