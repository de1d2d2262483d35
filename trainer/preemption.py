"""Preemption: SIGTERM and SIGUSR1 (what Slurm sends before preemption or the time limit)
set a flag; the ranks agree on it at the next step boundary, take a checkpoint and exit with
EXIT_PREEMPTED, which the launcher and the Slurm template turn into "run again".
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

from trainer import markers
from trainer.distributed import ranks_flagging

log = logging.getLogger("trainer.preemption")

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry".
EXIT_PREEMPTED = 75
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
MARKER = "preempted.json"


class Preempted(Exception):
    """Raised after the preemption checkpoint is written."""


class PreemptionWatch:
    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        # Only a flag: a handler cannot checkpoint (collectives, half-finished step).
        if self.signal is None:
            log.warning("received %s: checkpoint and exit at the next step boundary", signal.Signals(signum).name)
        self.signal = signum

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank was signalled."""
        return bool(ranks_flagging(self.signal is not None))


def write_marker(run_dir: Path, step: int, tag: str, signum: int | None) -> None:
    name = signal.Signals(signum).name if signum else "peer"
    record = {"step": step, "checkpoint": tag, "signal": name, "time": time.time()}
    markers.write(run_dir, MARKER, record)


def read_marker(run_dir: Path) -> dict | None:
    return markers.read(run_dir, MARKER)


def clear_marker(run_dir: Path) -> None:
    markers.clear(run_dir, MARKER)
