"""Metric sinks behind one interface: `log(metrics, step)`, `log_system(metrics, timestamp_ms)`
and `close(status)`.

Rank 0 owns the sinks: a `metrics.jsonl` in the run directory (always; system samples go to
`system_metrics.jsonl`) and an MLflow run (unless disabled). MLflow is imported lazily:
workers on other ranks never pay for it.

The MLflow sink never blocks or crashes training: a call only appends to a bounded
in-memory outbox, and one writer thread delivers it. While the tracking server is down,
slow or restarting, the outbox holds up to `mlflow.max_buffered_metrics` values (then drops
the oldest, counted) and the writer retries every `mlflow.retry_interval_s`; one warning
says so, one info line says when it is flushed. Params and tags are redacted (`redact`).
See docs/telemetry.md.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("trainer.metrics")

# MLflow caps a param value at 6000 characters, a log_batch call at 100 params/tags and 1000 metrics.
_MAX_PARAM_CHARS = 6000
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000


class MLflowConfig(BaseModel):
    """Where the job's MLflow run goes, and how an unreachable tracking server is ridden out."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="log to MLflow (metrics.jsonl is always written)")
    tracking_uri: str | None = Field(
        None, description="any MLflow tracking URI; default: sqlite file mlflow.db in the output directory"
    )
    experiment: str = Field("t5ja", description="MLflow experiment name")
    log_model: bool = Field(True, description="upload the exported Hugging Face model dir as an artifact")
    max_buffered_metrics: int = Field(
        100_000, gt=0, description="metric values held while the tracking server is unreachable; beyond, the "
                                   "oldest are dropped and counted (metrics.jsonl keeps them all)"
    )
    retry_interval_s: float = Field(5.0, gt=0, description="seconds between two tries of an unreachable server")
    request_timeout_s: int = Field(
        15, gt=0, description="MLFLOW_HTTP_REQUEST_TIMEOUT of the trainer's requests, unless that variable is set"
    )
    close_timeout_s: float = Field(
        60.0, ge=0, description="at the end of the run: seconds an unreachable server is waited for before what "
                                "is still buffered is given up (logged)"
    )


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": "0.001"}; lists become JSON strings."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            flat[name] = text[:_MAX_PARAM_CHARS]
    return flat


# ---- redaction ------------------------------------------------------------------------

REDACTED = "[REDACTED]"
_SECRET_WORDS = {"password", "passwd", "pwd", "passphrase", "secret", "secrets", "token", "credential",
                 "credentials", "apikey", "auth", "authorization", "cookie", "private"}
# Tokenizer vocabulary, not secrets: eos_token, pad_token, ...
_SPECIAL_TOKEN_ROLES = {"pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "start", "end", "extra"}
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://[^/\s:@]+):[^@/\s]+@")


def _words(component: str) -> list[str]:
    """`AWS_SECRET_ACCESS_KEY` -> [aws, secret, access, key]; `apiKey` -> [api, key]."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", component)
    return [w for w in re.split(r"[^a-zA-Z0-9]+", spaced.lower()) if w]


def is_secret_name(name: str) -> bool:
    """True when a dotted component of `name` names a secret: one of its words is
    password/secret/token/credential/auth/private/... (whole words: `tokenizer`, `num_tokens`
    are not), or its last word is `key` (api_key, AWS_SECRET_ACCESS_KEY; not key_dim).
    `eos_token` and the other special-token names of a tokenizer are not secrets."""
    for component in name.split("."):
        words = _words(component)
        for i, word in enumerate(words):
            if word in _SECRET_WORDS and not (word == "token" and i and words[i - 1] in _SPECIAL_TOKEN_ROLES):
                return True
        if words and words[-1] == "key":
            return True
    return False


def redact_value(value: str) -> str:
    """Passwords inside URLs (`https://user:pass@host` -> `https://user:[REDACTED]@host`)."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}:{REDACTED}@", value)


def redact(flat: dict[str, str]) -> dict[str, str]:
    """Params, tags or environment variables with secrets replaced by [REDACTED]."""
    return {k: REDACTED if is_secret_name(k) else redact_value(str(v)) for k, v in flat.items()}


def redact_tree(tree: Any, name: str = "") -> Any:
    """`redact` for a nested config (the config.json artifact)."""
    if isinstance(tree, dict):
        return {k: REDACTED if is_secret_name(f"{name}.{k}") else redact_tree(v, f"{name}.{k}")
                for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact_tree(v, name) for v in tree]
    return redact_value(tree) if isinstance(tree, str) else tree


# ---- metrics.jsonl --------------------------------------------------------------------

def read_records(path: Path) -> list[dict]:
    """The complete records of a JSON-lines file another process may be appending to. A read
    can land between the bytes of one write, so a last line without its newline is still being
    written: it is left for the next read, not parsed (a test polling mid-run once failed on
    '{"step": 9, "time": 1795910396.6083918, "tr')."""
    if not path.is_file():
        return []
    complete = path.read_text(encoding="utf-8").split("\n")[:-1]
    return [json.loads(line) for line in complete if line.strip()]


class JsonlLogger:
    """Step metrics to metrics.jsonl, system samples to system_metrics.jsonl (monitor threads
    write those: hence the lock)."""

    def __init__(self, path: Path):
        self._file = open(path, "a", encoding="utf-8")
        self._system_path = path.with_name("system_" + path.name)
        self._system_file = None
        self._lock = threading.Lock()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._write(self._file, {"step": step, "time": time.time(), **metrics})

    def log_system(self, metrics: dict[str, float], timestamp_ms: int) -> None:
        with self._lock:
            if self._file.closed:  # a monitor still running after close(): nothing to write to
                return
            if self._system_file is None:
                self._system_file = open(self._system_path, "a", encoding="utf-8")
            self._write(self._system_file, {"time": timestamp_ms / 1000, **metrics})

    @staticmethod
    def _write(file, record: dict) -> None:
        file.write(json.dumps(record) + "\n")
        file.flush()

    def close(self, status: str = "FINISHED") -> None:
        with self._lock:
            self._file.close()
            if self._system_file is not None:
                self._system_file.close()
                self._system_file = None


# ---- MLflow -----------------------------------------------------------------------------

def is_transient(err: Exception) -> bool:
    """Worth retrying: the server is down, slow, restarting or overloaded (no connection, a
    timeout, 5xx, 429). A 4xx is about the request itself, and a local error (an artifact
    file gone) about us: sending it again would fail again."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):  # MLflow wraps its REST client's errors: no answer is a 500
        status = err.get_http_status_code()
    elif isinstance(err, requests.HTTPError) and err.response is not None:  # artifact uploads
        status = err.response.status_code
    else:
        return isinstance(err, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout))
    return status >= 500 or status == 429


def limit_http_retries(cfg: MLflowConfig) -> None:
    """MLflow retries a failed request 7 times with exponential backoff (minutes) and waits
    120 s for an answer; the writer thread retries by itself (and urllib3 would log a warning
    per retry), so no retries and a short timeout. Read by MLflow at each request; a
    variable the user set wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.request_timeout_s))


def get_experiment_id(client, name: str, tracking_uri: str) -> str:
    """The id of experiment `name`, created if new (`client`: an MlflowClient of tracking_uri)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A file-backed store keeps artifacts beside its database, not in the CWD's ./mlruns.
    location = None
    if tracking_uri.startswith("sqlite:///"):
        db_path = Path(tracking_uri[len("sqlite:///"):])
        location = (db_path.parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


@dataclass
class _Op:
    what: str  # for the log: "params", "artifact config.json", "run status FINISHED"
    call: Callable[[], Any]


class _Outbox:
    """What waits for the tracking server: metric values (bounded, oldest dropped first) and,
    in order, the few other operations (params, tags, artifacts, the final status)."""

    def __init__(self, max_metrics: int):
        self._lock = threading.Lock()
        self._metrics: deque = deque()
        self._ops: deque[_Op] = deque()
        self._max_metrics = max_metrics
        self.num_dropped = 0

    def add_metrics(self, metrics: list) -> int:
        """Returns how many old values were dropped to make room."""
        with self._lock:
            self._metrics.extend(metrics)
            return self._trim()

    def _trim(self) -> int:
        excess = max(0, len(self._metrics) - self._max_metrics)
        for _ in range(excess):
            self._metrics.popleft()
        self.num_dropped += excess
        return excess

    def take_metrics(self, limit: int) -> list:
        with self._lock:
            return [self._metrics.popleft() for _ in range(min(limit, len(self._metrics)))]

    def put_back_metrics(self, batch: list) -> None:
        """An undelivered batch goes back in front, as the oldest values."""
        with self._lock:
            self._metrics.extendleft(reversed(batch))
            self._trim()

    def add_op(self, op: _Op) -> None:
        with self._lock:
            self._ops.append(op)

    def first_op(self) -> _Op | None:
        with self._lock:
            return self._ops[0] if self._ops else None

    def pop_op(self) -> None:
        with self._lock:
            self._ops.popleft()

    def sizes(self) -> tuple[int, int]:
        with self._lock:
            return len(self._metrics), len(self._ops)


@dataclass
class _Outage:
    since: float  # time.monotonic()
    num_dropped_before: int


class MLflowLogger:
    """One MLflow run per job. Its id is kept in RUN_DIR/mlflow_run_id so that a restarted
    job continues the same run instead of starting a second one.

    Every call returns at once: a writer thread talks to the tracking store. `run_id` is None
    while a server that was down at start has not come back yet.
    """

    def __init__(self, cfg: MLflowConfig, tracking_uri: str, run_dir: Path, run_name: str, description: str):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        limit_http_retries(cfg)
        self._cfg = cfg
        self._tracking_uri = tracking_uri
        self._run_dir = run_dir
        self._run_name = run_name
        self._description = description
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._outbox = _Outbox(cfg.max_buffered_metrics)
        self._outage: _Outage | None = None
        self._reachable = True  # the last request got through (read by close())
        self._warned_full = False
        self._step = 0  # the last training step logged: the step of system samples
        self._valid_names: dict[str, bool] = {}
        self._closing = threading.Event()
        self._abandon = threading.Event()
        self._wake = threading.Event()
        self.run_id: str | None = None
        try:
            self._open_run()
        except (MlflowException, OSError) as err:
            if not is_transient(err):
                raise  # a wrong URI, credentials or experiment: better said before training starts
            self._went_down(err)
        self._writer = threading.Thread(target=self._write_loop, name="mlflow-writer", daemon=True)
        self._writer.start()

    # ---- the run ---------------------------------------------------------------------
    def _open_run(self) -> None:
        id_file = self._run_dir / "mlflow_run_id"
        run_id = self._continue_run(id_file.read_text().strip()) if id_file.exists() else None
        if run_id is None:
            experiment_id = get_experiment_id(self._client, self._cfg.experiment, self._tracking_uri)
            run = self._client.create_run(experiment_id, run_name=self._run_name,
                                          tags={"mlflow.note.content": self._description})
            run_id = run.info.run_id
            id_file.write_text(run_id + "\n")
        self.run_id = run_id

    def _continue_run(self, run_id: str) -> str | None:
        """The run a restarted job continues; None if this tracking store does not know it
        (the run directory was moved, or the store replaced): then a new run is started."""
        from mlflow.exceptions import MlflowException

        try:
            self._client.update_run(run_id, status="RUNNING")
        except MlflowException as err:
            if is_transient(err):
                raise
            log.warning("MLflow run %s from mlflow_run_id is not in this tracking store (%s); starting a new run",
                        run_id, err.error_code)
            return None
        return run_id

    # ---- what callers see: all return at once ------------------------------------------
    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in redact(params).items()]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            batch = items[start:start + _PARAMS_PER_BATCH]
            self._add_op(f"{len(batch)} params", lambda b=batch: self._client.log_batch(self.run_id, params=b))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in redact(tags).items()]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            batch = items[start:start + _PARAMS_PER_BATCH]
            self._add_op(f"{len(batch)} tags", lambda b=batch: self._client.log_batch(self.run_id, tags=b))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._step = step
        self._add_metrics(metrics, int(time.time() * 1000), step)

    def log_system(self, metrics: dict[str, float], timestamp_ms: int) -> None:
        """A monitor's sample, at the time it was taken and the last training step logged."""
        self._add_metrics(metrics, timestamp_ms, self._step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Uploaded by the writer thread: the file must stay until close()."""
        if path.is_dir():
            call = lambda: self._client.log_artifacts(self.run_id, str(path), artifact_path)  # noqa: E731
        else:
            call = lambda: self._client.log_artifact(self.run_id, str(path), artifact_path)  # noqa: E731
        self._add_op(f"artifact {path.name}", call)

    def log_dict(self, tree: dict, artifact_file: str) -> None:
        """A JSON artifact of `tree` with secrets redacted (the resolved config)."""
        redacted = redact_tree(tree)
        self._add_op(f"artifact {artifact_file}", lambda: self._client.log_dict(self.run_id, redacted, artifact_file))

    def close(self, status: str = "FINISHED") -> None:
        """Delivers what waits, then the run's status. Waits as long as the server accepts
        requests; gives up after close_timeout_s of it being unreachable (logged)."""
        self._add_op(f"run status {status}", lambda: self._client.set_terminated(self.run_id, status=status))
        self._closing.set()
        self._wake.set()
        self._wait_for_writer()

    # ---- the outbox ----------------------------------------------------------------------
    def _add_metrics(self, metrics: dict[str, float], timestamp_ms: int, step: int) -> None:
        from mlflow.entities import Metric

        if self._closing.is_set():
            log.debug("MLflow: %d metric values after close() ignored", len(metrics))
            return
        values = [Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items() if self._is_valid_name(k)]
        if self._outbox.add_metrics(values) and not self._warned_full:
            self._warned_full = True  # again after the next complete flush
            log.warning("MLflow: %d metric values buffered: dropping the oldest (metrics.jsonl keeps them)",
                        self._cfg.max_buffered_metrics)
        if self._outage is None:  # while down, the writer waits for its retry time instead
            self._wake.set()

    def _is_valid_name(self, key: str) -> bool:
        """MLflow refuses a whole batch for one bad name: such names are left out here, each
        logged once."""
        from mlflow.utils.validation import path_not_unique, validate_param_and_metric_name

        valid = self._valid_names.get(key)
        if valid is None:
            valid = self._valid_names[key] = bool(validate_param_and_metric_name(key)) and not path_not_unique(key)
            if not valid:
                log.error("MLflow: metric name %r is not valid in MLflow; its values go to metrics.jsonl only", key)
        return valid

    def _add_op(self, what: str, call: Callable[[], Any]) -> None:
        if self._closing.is_set():
            log.warning("MLflow: %s after close() ignored", what)
            return
        self._outbox.add_op(_Op(what, call))
        self._wake.set()

    # ---- the writer thread ----------------------------------------------------------------
    def _write_loop(self) -> None:
        while not self._abandon.is_set():
            self._wake.clear()  # before delivering: a value added meanwhile sets it again
            delivered = self._deliver()
            if delivered and self._closing.is_set() and self._outbox.sizes() == (0, 0):
                return
            if delivered:
                self._wake.wait()
            else:
                self._abandon.wait(self._cfg.retry_interval_s)

    def _deliver(self) -> bool:
        """Sends everything that waits; False when the server is unreachable (retry later)."""
        if self.run_id is None:
            if not self._send("opening the run", self._open_run):
                return False
            if self.run_id is None:  # refused for good (logged): nothing can be delivered
                self._abandon.set()
                return False
        num_sent = 0
        while batch := self._outbox.take_metrics(_METRICS_PER_BATCH):
            send = lambda: self._client.log_batch(self.run_id, metrics=batch)  # noqa: E731
            if not self._send(f"{len(batch)} metric values", send):
                self._outbox.put_back_metrics(batch)
                return False
            num_sent += len(batch)
        while (op := self._outbox.first_op()) is not None:
            if not self._send(op.what, op.call):
                return False
            self._outbox.pop_op()
        self._end_outage(num_sent)
        return True

    def _send(self, what: str, call: Callable[[], Any]) -> bool:
        """call() against the tracking store. True when done with it: delivered, or refused
        for good (a 4xx: logged and dropped); False when the server is unreachable."""
        from mlflow.exceptions import MlflowException

        try:
            call()
        except (MlflowException, OSError) as err:
            if is_transient(err):
                self._went_down(err)
                return False
            log.error("MLflow refused %s: %s; dropped", what, err)
        except Exception:  # noqa: BLE001 - one bad request must not stop delivery of the rest; traceback logged
            log.exception("MLflow: sending %s failed; dropped", what)
        self._reachable = True
        return True

    def _went_down(self, err: Exception) -> None:
        self._reachable = False
        if self._outage is None:
            self._outage = _Outage(time.monotonic(), self._outbox.num_dropped)
            log.warning("MLflow tracking store unreachable (%s); training goes on, metrics are buffered (at most "
                        "%d values) and retried every %g s", _short(err), self._cfg.max_buffered_metrics,
                        self._cfg.retry_interval_s)

    def _end_outage(self, num_sent: int) -> None:
        self._warned_full = False
        outage, self._outage = self._outage, None
        if outage is not None:
            log.info("MLflow tracking store reachable again after %.0f s: flushed %d buffered metric values "
                     "(%d dropped)", time.monotonic() - outage.since, num_sent,
                     self._outbox.num_dropped - outage.num_dropped_before)

    def _wait_for_writer(self) -> None:
        unreachable_since = None
        while self._writer.is_alive():
            if self._reachable:
                unreachable_since = None
            elif unreachable_since is None:
                unreachable_since = time.monotonic()
            elif time.monotonic() - unreachable_since > self._cfg.close_timeout_s:
                self._give_up()
                return
            self._writer.join(0.1)

    def _give_up(self) -> None:
        self._abandon.set()
        num_metrics, num_ops = self._outbox.sizes()
        log.error("MLflow tracking store unreachable for %g s at close: %d metric values (metrics.jsonl has "
                  "them) and %d other requests (params, tags, artifacts, the run's final status) not delivered",
                  self._cfg.close_timeout_s, num_metrics, num_ops)


def _short(err: Exception) -> str:
    """The gist of a request error: MLflow's wraps urllib3's, which wraps the socket's."""
    text = str(err) or type(err).__name__
    socket_error = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    return socket_error.group(0) if socket_error else text.splitlines()[0][:200]


class MetricLogger:
    """Fans metrics out to every sink of rank 0."""

    def __init__(self, sinks: list, mlflow: MLflowLogger | None):
        self._sinks = sinks
        self.mlflow = mlflow

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self._sinks:
            sink.log(metrics, step)

    def log_system(self, metrics: dict[str, float], timestamp_ms: int) -> None:
        """A telemetry sample (trainer.telemetry.Sink): called from monitor threads."""
        for sink in self._sinks:
            sink.log_system(metrics, timestamp_ms)

    def close(self, status: str = "FINISHED") -> None:
        for sink in self._sinks:
            sink.close(status)


def build_metric_logger(cfg: MLflowConfig, tracking_uri: str, run_dir: Path, run_name: str,
                        description: str) -> MetricLogger:
    sinks: list = [JsonlLogger(run_dir / "metrics.jsonl")]
    mlflow = None
    if cfg.enabled:
        mlflow = MLflowLogger(cfg, tracking_uri, run_dir, run_name, description)
        sinks.append(mlflow)
    return MetricLogger(sinks, mlflow)
