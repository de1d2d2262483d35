"""launcher.max_restarts -> torchrun --max-restarts: a rank that dies (SIGKILL, injected with
T5JA_FAULT_CRASH_AT_STEP on rank 1 in the first round only) takes the job through a real
torchrun restart, and the new workers resume from the latest checkpoint, exactly. Also the
launcher's side of it: the torchrun line, its environment, the exit code it reports."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from launcher.job import load_job
from launcher.run import get_exit_code, plan_run, torchrun_command
from test_nonfinite import run_with_faults
from test_resume import assert_same_run, train_args
from trainer import nonfinite, preemption


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


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("reference_run", ["zero2"], indirect=True)
def test_rank_killed_at_step_15_is_survived_by_a_torchrun_restart_that_resumes_exactly(reference_run, tmp_path,
                                                                                       tiny_data):
    """Rank 1 dies at step 15 (checkpoint 10 exists): torchrun restarts both ranks, which resume
    from step 10 and finish with the uninterrupted run's weights, in one MLflow run. (Without
    restarts the same death fails the command with a resume hint: test_resume's mid-save test.)"""
    stage, _, reference = reference_run
    logs = tmp_path / "run/logs"
    # MLflow on (train_args turns it off): the run must stay one MLflow run through the restart.
    result = run_with_faults(train_args(tmp_path, tiny_data, stage, "mlflow.enabled=true", "launcher.max_restarts=1"),
                             T5JA_FAULT_CRASH_AT_STEP="15")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (logs / "rank_1.log").read_text().count("T5JA_FAULT_CRASH_AT_STEP=15: killing this rank (SIGKILL)") == 1
    rank0 = (logs / "rank_0.log").read_text()
    restart = rank0.index("torchrun restart 1 of at most 1")
    assert "resumed from step_00000010 (step 10)" in rank0[restart:]
    state = json.loads((tmp_path / "run/checkpoints/step_00000040/train_state.json").read_text())
    assert state["restarts"] == [10] and state["consumed_samples"] == 16 * 40
    assert_same_run(tmp_path / "run", reference, from_step=11)
    # Telemetry of it: the restarted start reports 1 torchrun restart, 1 crash.
    starts = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
              if "restarts/restart_count" in line]
    assert [(s["step"], s["restarts/restart_count"], s["errors/crash_count"]) for s in starts] == \
        [(0, 0, 0), (10, 1, 1)]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["restart_count"] == "1" and runs[0].data.tags["crash_count"] == "1"
