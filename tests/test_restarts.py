"""launcher.max_restarts -> torchrun --max-restarts: a rank that dies (SIGKILL, injected with
T5JA_FAULT_CRASH_AT_STEP on rank 1 in the first round only) takes the job through a real
torchrun restart, and the new workers resume from the latest checkpoint, exactly; without
restarts (a rank killed in the middle of a save), the command fails, leaving the previous
checkpoint. Also the launcher's side of it: the torchrun line, its environment, the exit
code it reports."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, seed_mlflow_db
from launcher.job import load_job
from launcher.run import get_exit_code, plan_run, torchrun_command
from test_nonfinite import run_with_faults
from test_resume import assert_same_run, train_args
from trainer import nonfinite, preemption
from trainer.metrics import read_records


def test_torchrun_gets_a_fresh_store_per_restart_round(tmp_path):
    job = load_job(ROOT / "configs/quickstart.yaml", [f"output_dir={tmp_path}", "launcher.max_restarts=2"])
    plan = plan_run(job)
    assert plan.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert plan.command[plan.command.index("--max-restarts") + 1] == "2" and "--standalone" in plan.command
    fixed = load_job(ROOT / "configs/quickstart.yaml", [f"output_dir={tmp_path}", "launcher.master_port=29411"])
    command = torchrun_command(fixed, tmp_path / "config.json")
    # c10d honours the variable; the static rendezvous of --master-port keeps one store for all rounds
    assert "--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29411" in " ".join(command)
    assert "--master-port" not in command


def test_exit_code_comes_from_the_workers_marker(tmp_path):
    assert get_exit_code(tmp_path, 1) == 1
    err = nonfinite.NonFiniteLoss(12, [1], "train.nonfinite_loss=stop", "step_00000010")
    nonfinite.write_marker(tmp_path, err)
    assert get_exit_code(tmp_path, 1) == nonfinite.EXIT_NONFINITE_LOSS == 3
    preemption.write_marker(tmp_path, 12, "step_00000012", None)
    assert get_exit_code(tmp_path, 1) == preemption.EXIT_PREEMPTED


def start_lines(run_dir) -> list[tuple[int, int, int]]:
    """(step, restart count, crash count) of each run start, from metrics.jsonl."""
    rows = [r for r in read_records(run_dir / "metrics.jsonl") if "restarts/restart_count" in r]
    return [(r["step"], r["restarts/restart_count"], r["errors/crash_count"]) for r in rows]


def assert_killed_mid_save_of_15(result, run_dir) -> None:
    """Rank 1 died (SIGKILL) with its files of step 15 written while rank 0 waited at the
    barrier before the manifest: step 15 never became visible. Without launcher.max_restarts
    the dead rank ends the command, which says what to do, and the run directory counts the
    failed command (errors/crash_count of the next start)."""
    ckpts = run_dir / "checkpoints"
    assert result.returncode not in (0, 3, 75), result.stdout[-3000:] + result.stderr[-3000:]
    assert "training failed (torchrun exit code 1) with launcher.max_restarts=0" in result.stderr
    assert "Running the same command again resumes from step_00000010." in result.stderr
    assert len((run_dir / "failures.jsonl").read_text().splitlines()) == 1
    assert (ckpts / "step_00000015.staging").is_dir() and not (ckpts / "step_00000015").exists()
    assert (ckpts / "latest").read_text().strip() == "step_00000010"


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("reference_run", ["zero2"], indirect=True)
def test_rank_killed_mid_save_then_at_step_15_is_survived_by_a_torchrun_restart_that_resumes_exactly(
        reference_run, tmp_path, tiny_data, mlflow_db):
    """Two commands, one run directory (a checkpoint every 5 steps, which changes no number):
    1. rank 1 dies in the middle of the save of step 15 (T5JA_FAULT_CRASH_IN_SAVE), without
       restarts: the command fails and step 10 stays the latest checkpoint;
    2. the same command with launcher.max_restarts=1 resumes from step 10, and rank 1 dies
       again as it starts step 15 (T5JA_FAULT_CRASH_AT_STEP, first torchrun round only):
       torchrun restarts both ranks, which resume from step 10 and finish with the
       uninterrupted run's weights, in one MLflow run."""
    stage, _, reference = reference_run
    run_dir, logs = tmp_path / "run", tmp_path / "run/logs"
    args = train_args(tmp_path, tiny_data, stage, "checkpoint.every_steps=5")
    assert_killed_mid_save_of_15(run_with_faults(args, T5JA_FAULT_CRASH_IN_SAVE="15"), run_dir)

    # MLflow on (train_args turns it off): the run must stay one MLflow run through the restart.
    seed_mlflow_db(mlflow_db, tmp_path)
    result = run_with_faults(args + ["mlflow.enabled=true", "launcher.max_restarts=1"], T5JA_FAULT_CRASH_AT_STEP="15")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (logs / "rank_1.log").read_text().count("T5JA_FAULT_CRASH_AT_STEP=15: killing this rank (SIGKILL)") == 1
    rank0 = (logs / "rank_0.log").read_text()
    restart = rank0.index("torchrun restart 1 of at most 1")
    assert "resumed from step_00000010 (step 10)" in rank0[restart:]
    state = json.loads((run_dir / "checkpoints/step_00000040/train_state.json").read_text())
    # [10]: the first round resumed from step 10 too, but died before it saved anything.
    assert state["restarts"] == [10] and state["consumed_samples"] == 16 * 40
    assert not (run_dir / "checkpoints/step_00000015.staging").exists()  # the next save of 15 replaced it
    assert_same_run(run_dir, reference, from_step=11)
    # Telemetry of it: the failed command counts as a crash at the next start, the death in
    # the first round as one more, with the torchrun restart.
    assert start_lines(run_dir) == [(0, 0, 0), (10, 0, 1), (10, 1, 2)]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["restart_count"] == "1" and runs[0].data.tags["crash_count"] == "2"
