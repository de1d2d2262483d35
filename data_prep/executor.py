"""Runs the docs stage's units: local worker processes, a share of a Slurm array, resumable.

A unit is done when its directory exists (worker.py publishes it atomically), so a run
killed at any moment and started again redoes only the units that had not finished.
Slurm array task i of n takes the units whose index % n == i; the merge runs once all
units are done.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from data_prep.config import DataConfig
from data_prep.units import Unit, get_params_digest, get_plan_params, units_to_json
from data_prep.worker import init_child_process, init_worker, run_unit

PROGRESS_EVERY_S = 30.0


@dataclass(frozen=True)
class TaskShare:
    """Which share of the units this process runs (Slurm array task index of count)."""

    index: int = 0
    count: int = 1

    def owns(self, unit: Unit) -> bool:
        return unit.index % self.count == self.index

    @classmethod
    def from_env(cls, index: int | None, count: int | None) -> "TaskShare":
        """Explicit values win; else SLURM_ARRAY_TASK_ID/COUNT (ids may start at MIN, e.g. --array=1-4)."""
        env = os.environ
        if index is None and "SLURM_ARRAY_TASK_ID" in env:
            index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            count = count or int(env["SLURM_ARRAY_TASK_COUNT"])
        share = cls(index or 0, count or 1)
        if not 0 <= share.index < share.count:
            raise ValueError(f"task index {share.index} is not in [0, {share.count})")
        return share


def prepare_work_dir(work_dir: Path, data: DataConfig, units: list[Unit], share: TaskShare, log,
                     spiece_path: Path | None = None) -> None:
    """Keep finished units if the plan is unchanged; otherwise start the work directory over."""
    task_mode = share.count > 1
    params = get_plan_params(data, spiece_path)
    digest = get_params_digest(params)
    plan_file = work_dir / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text())["digest"] != digest:
        if task_mode:
            raise RuntimeError(f"{work_dir}: planned with other settings; run `t5ja prep` once without a task "
                               "index (or delete the directory) before starting array tasks")
        log(f"docs: inputs or settings changed; discarding finished units in {work_dir}")
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    # Left by a killed worker; only this task's units: the other array tasks may be writing theirs.
    owned = {unit.name for unit in units if share.owns(unit)}
    for stale in work_dir.glob("u-*.tmp-*"):
        if stale.name.split(".tmp-")[0] in owned:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = work_dir / f"plan.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"digest": digest, "params": params, "units": units_to_json(units)}, indent=1))
    tmp.replace(plan_file)


def is_done(work_dir: Path, unit: Unit) -> bool:
    return (work_dir / unit.name / "stats.json").is_file()


def get_num_workers(data: DataConfig) -> int:
    return data.num_workers or os.cpu_count() or 1


def run_units(units: list[Unit], data: DataConfig, work_dir: Path, share: TaskShare, log,
              spiece_path: Path | None = None) -> list[dict]:
    """Run this task's unfinished units; returns their errors (unreadable inputs), if any."""
    pending = [u for u in units if share.owns(u) and not is_done(work_dir, u)]
    done_before = sum(1 for u in units if share.owns(u)) - len(pending)
    log(f"docs: {len(pending)} unit(s) to run, {done_before} already done, {get_num_workers(data)} worker(s)")
    progress = Progress(len(pending), log)
    errors = []
    for result in _iter_results(pending, data, work_dir, spiece_path):
        if "error" in result:
            errors.append(result)
            log(f"docs: unit {result['unit']} failed: {result['error']}")
        progress.update(result)
    progress.close()
    return errors


def _iter_results(pending: list[Unit], data: DataConfig, work_dir: Path, spiece_path: Path | None):
    if not pending:  # all done already: no worker (nor its tokenizer) to set up
        return
    # Built here, before the fork: the workers share its SentencePiece model instead of each
    # loading its own (read-only pages, never copied).
    init_worker(data, spiece_path)
    workers = min(get_num_workers(data), len(pending))
    if workers == 1:
        for unit in pending:
            yield run_unit(unit, str(work_dir))
        return
    # fork: workers start in milliseconds and inherit the imported modules and the processor.
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=init_child_process) as pool:
        futures = [pool.submit(run_unit, unit, str(work_dir)) for unit in pending]
        for future in as_completed(futures):
            yield future.result()


class Progress:
    """A progress bar with docs/s and MB/s on a terminal; a log line every 30 s otherwise."""

    def __init__(self, total: int, log):
        self.total, self.log = total, log
        self.done = self.docs = self.bytes = 0
        self.start = self.last_log = time.time()
        self.bar = None
        if sys.stderr.isatty() and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="unit", desc="docs", dynamic_ncols=True)

    def update(self, result: dict) -> None:
        self.done += 1
        self.docs += result.get("num_docs_in", 0)
        self.bytes += result.get("text_bytes_in", 0)
        elapsed = max(time.time() - self.start, 1e-9)
        rates = f"{self.docs / elapsed:,.0f} docs/s, {self.bytes / elapsed / 1e6:.1f} MB/s"
        if self.bar is not None:
            self.bar.set_postfix_str(rates, refresh=False)
            self.bar.update(1)
        elif time.time() - self.last_log >= PROGRESS_EVERY_S or self.done == self.total:
            self.log(f"docs: {self.done}/{self.total} units, {rates}")
            self.last_log = time.time()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
