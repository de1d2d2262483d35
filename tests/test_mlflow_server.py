"""The MLflow sink against a real `mlflow server` (sqlite backend, 127.0.0.1) that is down at
the start, comes up, is stopped (SIGTERM) in the middle of the run and restarted on the same
port and store: training's log calls never wait, and every metric ends in the one run."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import seed_mlflow_db
from trainer.metrics import REDACTED, MLflowConfig, build_metric_logger, is_transient

MAX_CALL_S = 0.5  # a log call while the server is down must cost training nothing noticeable


def get_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` in a session of its own (the CLI starts uvicorn as a child)."""

    def __init__(self, root: Path, port: int):
        self.root = root
        self.port = port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        log_file = open(self.root / "server.log", "a")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: a faster start
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            cwd=self.root, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_healthy(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"mlflow server on port {self.port} not healthy after {timeout_s} s")

    def stop(self) -> None:
        """SIGTERM to the server's session (the CLI and its uvicorn), SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _timed_log(logger, step: int, durations: list[float], system: bool = True) -> None:
    start = time.perf_counter()
    logger.log({"train/loss": 10.0 / step, "train/lr": 1e-3}, step)
    if system:
        logger.log_system({"system/node0/cpu_percent": float(step), "system/node1/cpu_percent": float(step)},
                          int(time.time() * 1000))
    durations.append(time.perf_counter() - start)


@pytest.mark.service
def test_metrics_survive_a_server_down_at_start_and_restarted_mid_run(tmp_path, monkeypatch, caplog, mlflow_db):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    caplog.set_level(logging.INFO, "trainer.metrics")
    seed_mlflow_db(mlflow_db, tmp_path)  # the server's store
    server = MlflowServer(tmp_path, get_free_port())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = MLflowConfig(tracking_uri=server.uri, retry_interval_s=0.5, close_timeout_s=60)
    durations: list[float] = []
    try:
        # 1. Nothing listens yet: the logger starts anyway, without a run id.
        logger = build_metric_logger(cfg, server.uri, run_dir, "run", "test run")
        assert logger.mlflow.run_id is None
        logger.mlflow.log_params({"train.lr": "0.1", "hf_token": "hf_secret"})
        server.start()
        step = 0
        while step < 10:
            step += 1
            _timed_log(logger, step, durations)
        server.wait_healthy()
        # 2. Up: the run is created, the backlog flushed. A refused request (a param cannot
        #    change its value) is dropped without holding up what follows it.
        logger.mlflow.log_params({"train.lr": "0.2"})
        for _ in range(10):
            step += 1
            _timed_log(logger, step, durations)
        _wait_for(lambda: logger.mlflow.run_id is not None and logger.mlflow._outbox.sizes() == (0, 0))
        # 3. SIGTERM mid-run: training logs on, each call returns at once.
        server.stop()
        for _ in range(20):
            step += 1
            _timed_log(logger, step, durations)
            time.sleep(0.1)
        # 4. Restarted on the same port and store: the buffer is flushed.
        server.start()
        server.wait_healthy()
        for _ in range(10):
            step += 1
            _timed_log(logger, step, durations)
        start = time.perf_counter()
        logger.close("FINISHED")
        close_s = time.perf_counter() - start
        _check_run(server.uri, run_dir, step)
    finally:
        server.stop()
    print(f"log calls: max {max(durations) * 1000:.1f} ms over {len(durations)}; close {close_s:.2f} s")
    assert max(durations) < MAX_CALL_S
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 2  # one warning per outage, not per try
    assert sum("reachable again" in m for m in messages) == 2
    assert any("refused 1 params" in m for m in messages)


def _check_run(uri: str, run_dir: Path, num_steps: int) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.1", "hf_token": REDACTED}
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, num_steps + 1))
    for node in ("node0", "node1"):
        history = client.get_metric_history(run_id, f"system/{node}/cpu_percent")
        assert sorted(m.value for m in history) == [float(s) for s in range(1, num_steps + 1)]
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert [r.info.run_id for r in runs] == [run_id]  # one run, though the server was down at the start


def _wait_for(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_unreachable_server_costs_no_time_and_the_buffer_is_bounded(tmp_path, monkeypatch, caplog):
    """Nothing listens on the port: calls return at once, the outbox keeps the newest
    `max_buffered_metrics` values, and close() gives up after close_timeout_s, saying so."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    caplog.set_level(logging.INFO, "trainer.metrics")
    uri = f"http://127.0.0.1:{get_free_port()}"
    cfg = MLflowConfig(max_buffered_metrics=10, retry_interval_s=0.2, close_timeout_s=1.0)
    logger = build_metric_logger(cfg, uri, tmp_path, "run", "test run")
    durations: list[float] = []
    for step in range(1, 26):
        _timed_log(logger, step, durations, system=False)  # 2 values a step: 50 in all
    assert max(durations) < MAX_CALL_S
    assert logger.mlflow._outbox.sizes()[0] == 10 and logger.mlflow._outbox.num_dropped == 40
    start = time.perf_counter()
    logger.close("FINISHED")
    assert 1.0 <= time.perf_counter() - start < 10
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable (" in m for m in messages) == 1
    assert sum("dropping the oldest" in m for m in messages) == 1
    assert any("not delivered" in m and "10 metric values" in m for m in messages)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 26))  # the local record has all


def test_transient_errors_are_retried_and_bad_requests_dropped():
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        INVALID_PARAMETER_VALUE, REQUEST_LIMIT_EXCEEDED, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE,
    )

    def http_error(status: int) -> requests.HTTPError:
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(response=response)

    # MLflow wraps "no connection" and timeouts into an INTERNAL_ERROR (500)
    assert is_transient(MlflowException("API request to http://h/api failed with exception ... refused"))
    assert is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert is_transient(MlflowException("slow down", error_code=REQUEST_LIMIT_EXCEEDED))
    assert is_transient(http_error(503)) and is_transient(ConnectionRefusedError()) and is_transient(requests.Timeout())
    assert not is_transient(MlflowException("param changed", error_code=INVALID_PARAMETER_VALUE))
    assert not is_transient(MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_transient(http_error(400)) and not is_transient(FileNotFoundError("artifact gone"))
