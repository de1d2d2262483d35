"""What a run start tells about the job's health: restarts, crashes and the last error, and
the all-reduce bus bandwidth between the ranks.

- Restarts: torchrun's restarts of this submission (TORCHELASTIC_RESTART_COUNT) and Slurm's
  requeues of the job (SLURM_RESTART_COUNT); `restart_count` is their sum.
- Crashes: each torchrun restart followed a worker failure, and the launcher appends a line
  to RUN_DIR/failures.jsonl when a whole submission fails (launcher/run.py); the last error
  is the newest root-cause traceback that a worker wrote through torchrun's error file
  (RUN_DIR/torchelastic/*/attempt_*/<rank>/error.json, written by `@record` on the worker's
  main). A worker killed by a signal (OOM killer, SIGKILL) leaves no traceback: torchrun's
  own message names the signal.
- Bus bandwidth: nccl-tests' definition, busbw = 2(n-1)/n x bytes / time of an all-reduce.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path


log = logging.getLogger("trainer.run_health")

FAILURES_FILE = "failures.jsonl"
TORCHELASTIC_DIR = "torchelastic"
MAX_ERROR_CHARS = 5000  # an MLflow tag value holds 8000 characters at most


@dataclass(frozen=True)
class Restarts:
    torchrun: int
    slurm_requeues: int

    @property
    def total(self) -> int:
        return self.torchrun + self.slurm_requeues

    @classmethod
    def from_env(cls, env=os.environ) -> Restarts:
        return cls(int(env.get("TORCHELASTIC_RESTART_COUNT", "0")), int(env.get("SLURM_RESTART_COUNT", "0")))


@dataclass(frozen=True)
class WorkerError:
    path: Path
    timestamp: float
    message: str


def read_worker_errors(run_dir: Path) -> list[WorkerError]:
    """Every worker error file torchrun collected for this run directory, oldest first."""
    errors = []
    for path in (run_dir / TORCHELASTIC_DIR).glob("*/attempt_*/*/error.json"):
        try:
            errors.append(parse_error_file(path))
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("%s: unreadable error file (%s)", path, err)
    return sorted(errors, key=lambda e: e.timestamp)


def parse_error_file(path: Path) -> WorkerError:
    """torchelastic's error.json: {"message": {"message": "...", "extraInfo": {"py_callstack",
    "timestamp"}}} (or a plain string message from non-Python failures)."""
    body = json.loads(path.read_text(encoding="utf-8"))["message"]
    if isinstance(body, str):
        return WorkerError(path, path.stat().st_mtime, body)
    extra = body.get("extraInfo", {})
    text = f"{body.get('message', '')}\n{extra.get('py_callstack', '')}".strip()
    return WorkerError(path, float(extra.get("timestamp", path.stat().st_mtime)), text)


def count_failed_submissions(run_dir: Path) -> int:
    path = run_dir / FAILURES_FILE
    return len(path.read_text(encoding="utf-8").splitlines()) if path.is_file() else 0


def record_failed_submission(run_dir: Path, exit_code: int) -> None:
    """Launcher side: one line per `t5ja train` whose torchrun ended in failure."""
    with open(run_dir / FAILURES_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.time(), "exit_code": exit_code}) + "\n")


def get_start_report(run_dir: Path, env=os.environ) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) of a run start on rank 0: restart counts, crash count, last error."""
    restarts = Restarts.from_env(env)
    errors = read_worker_errors(run_dir)
    crashes = restarts.torchrun + count_failed_submissions(run_dir)
    metrics = {"restarts/restart_count": restarts.total, "restarts/torchrun_restarts": restarts.torchrun,
               "restarts/slurm_requeues": restarts.slurm_requeues, "errors/crash_count": crashes}
    tags = {"restart_count": str(restarts.total), "torchrun_restarts": str(restarts.torchrun),
            "slurm_requeues": str(restarts.slurm_requeues), "crash_count": str(crashes)}
    if errors:
        last = errors[-1]
        tags["last_error"] = last.message[-MAX_ERROR_CHARS:]
        tags["last_error_file"] = str(last.path.relative_to(run_dir))
    return metrics, tags


def probe_allreduce_busbw(num_bytes: int, repeats: int = 5) -> float | None:
    """Collective: bus bandwidth in Gbit/s of an all-reduce of `num_bytes` (median of `repeats`
    after one warm-up), the same figure on every rank; None on one rank (nothing crosses)."""
    import torch  # the workers' side; the launcher records failures without torch
    import torch.distributed as dist

    world = dist.get_world_size()
    if world < 2 or num_bytes <= 0:
        return None
    device = _collective_device()
    tensor = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    times = []
    for i in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    seconds = torch.tensor([sorted(times)[len(times) // 2]], device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest rank's view: what a step waits for
    return 2 * (world - 1) / world * tensor.numel() * 4 * 8 / seconds.item() / 1e9


def _collective_device() -> torch.device:
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
