"""A real training run (`t5ja train`, 2 ranks under torchrun) logging to a real `mlflow server`
that is stopped (SIGTERM) in the middle of the run and restarted later on the same port and
store: the run finishes, every logged step and the node's system samples end up in the one
MLflow run, and its status is FINISHED."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import ROOT, seed_mlflow_db
from test_mlflow_server import MlflowServer, get_free_port
from trainer.metrics import read_records

STEPS, LOG_EVERY = 36, 2


def logged_step(run_dir) -> int:
    steps = [r["step"] for r in read_records(run_dir / "metrics.jsonl") if "train/loss" in r]
    return max(steps, default=0)


def wait_until(predicate, proc, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, "training ended early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.service
@pytest.mark.multiproc
def test_training_survives_the_tracking_server_going_away(tmp_path, tiny_data, mlflow_db):
    seed_mlflow_db(mlflow_db, tmp_path)  # the server's store
    server = MlflowServer(tmp_path, get_free_port())
    server.start()
    server.wait_healthy()
    run_dir = tmp_path / "out" / "run"
    cmd = [sys.executable, "-m", "launcher.cli", "train", str(ROOT / "configs/t5-tiny-zero3.yaml"), "name=run",
           f"output_dir={tmp_path / 'out'}", f"data.output_dir={tiny_data}", "deepspeed.config=zero2",
           f"train.steps={STEPS}", f"train.log_every={LOG_EVERY}", "train.global_batch_size=16",
           "train.micro_batch_size=8", "checkpoint.every_steps=0", "mlflow.log_model=false",
           f"mlflow.tracking_uri={server.uri}", "mlflow.retry_interval_s=0.5", "telemetry.interval_s=1"]
    train = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: logged_step(run_dir) >= 8, train)
        server.stop()
        down_at = logged_step(run_dir)
        wait_until(lambda: logged_step(run_dir) >= down_at + 12, train)  # training goes on without it
        server.start()
        server.wait_healthy()
        output, _ = train.communicate(timeout=600)
    finally:
        if train.poll() is None:
            train.kill()
    try:
        assert train.returncode == 0, output[-4000:]
        assert "MLflow tracking store unreachable" in (run_dir / "logs/rank_0.log").read_text()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.uri)
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        loss_steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert sorted(loss_steps) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))  # none lost while down
        assert client.get_metric_history(run_id, "system/node0/cpu_percent")
        assert client.get_metric_history(run_id, "system/allreduce_busbw_gbps")[0].value > 0
        assert run.data.tags["restart_count"] == "0"
    finally:
        server.stop()
