"""Metric sinks behind one interface: `log(metrics, step)` and `close(status)`.

Rank 0 owns the sinks: a `metrics.jsonl` in the run directory (always) and an MLflow run
(unless disabled). MLflow is imported lazily: workers on other ranks never pay for it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("trainer.metrics")

# MLflow caps a param value at 6000 characters and a log_batch call at 100 params.
_MAX_PARAM_CHARS = 6000
_PARAMS_PER_BATCH = 100


class MLflowConfig(BaseModel):
    """Where the job's MLflow run goes."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="log to MLflow (metrics.jsonl is always written)")
    tracking_uri: str | None = Field(
        None, description="any MLflow tracking URI; default: sqlite file mlflow.db in the output directory"
    )
    experiment: str = Field("t5ja", description="MLflow experiment name")
    log_model: bool = Field(True, description="upload the exported Hugging Face model dir as an artifact")


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


class JsonlLogger:
    def __init__(self, path: Path):
        self._file = open(path, "a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self._file.flush()

    def close(self, status: str = "FINISHED") -> None:
        self._file.close()


class MLflowLogger:
    """One MLflow run per job. Its id is kept in RUN_DIR/mlflow_run_id so that a restarted
    job continues the same run instead of starting a second one."""

    def __init__(self, cfg: MLflowConfig, tracking_uri: str, run_dir: Path, run_name: str, description: str):
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=tracking_uri)
        id_file = run_dir / "mlflow_run_id"
        self.run_id = self._continue_run(id_file.read_text().strip()) if id_file.exists() else None
        if self.run_id is None:
            experiment_id = self._experiment_id(cfg.experiment, tracking_uri, run_dir)
            run = self._client.create_run(experiment_id, run_name=run_name, tags={"mlflow.note.content": description})
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id + "\n")

    def _continue_run(self, run_id: str) -> str | None:
        """The run a restarted job continues; None if this tracking store does not know it
        (the run directory was moved, or the store replaced): then a new run is started."""
        from mlflow.exceptions import MlflowException

        try:
            self._client.update_run(run_id, status="RUNNING")
        except MlflowException as err:
            log.warning("MLflow run %s from mlflow_run_id is not in this tracking store (%s); starting a new run",
                        run_id, err.error_code)
            return None
        return run_id

    def _experiment_id(self, name: str, tracking_uri: str, run_dir: Path) -> str:
        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        # A file-backed store keeps artifacts beside its database, not in the CWD's ./mlruns.
        location = None
        if tracking_uri.startswith("sqlite:///"):
            db_path = Path(tracking_uri[len("sqlite:///"):])
            location = (db_path.parent / "mlartifacts").resolve().as_uri()
        return self._client.create_experiment(name, artifact_location=location)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[start:start + _PARAMS_PER_BATCH])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)


class MetricLogger:
    """Fans metrics out to every sink of rank 0."""

    def __init__(self, sinks: list, mlflow: MLflowLogger | None):
        self._sinks = sinks
        self.mlflow = mlflow

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self._sinks:
            sink.log(metrics, step)

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
