"""A NaN or inf loss (train.nonfinite_loss): the ranks agree whether any of them saw one in a
step, then either stop without saving that step (`stop`, exit code 3) or drop its update on
every rank (`skip`).

Skipping reuses DeepSpeed's own overflow path, the one fp16 loss scaling takes routinely: the
last backward of the step is given a NaN loss on every rank, so every rank's gradients are
non-finite, and the ZeRO optimizer's check (gradient norm or inf/NaN test, reduced over the
ranks; ZeRO-1/2/3, fp32/bf16/fp16) discards them: no weight or optimizer-state update, the
gradient buffers cleared, the micro-step accounting untouched. DeepSpeed then leaves the LR
scheduler alone; the trainer steps it, so the learning rate stays a function of the step.
"""

from __future__ import annotations

import time
from pathlib import Path

from trainer import markers

# t5ja's exit codes (README): 1 data, 2 config, 75 preempted; 3 says "stopped on purpose, do
# not simply rerun": the same data and weights give the same NaN again.
EXIT_NONFINITE_LOSS = 3
MARKER = "nonfinite_loss.json"


class NonFiniteLoss(Exception):
    """Raised on every rank when a step's loss was NaN/inf and the policy says stop."""

    def __init__(self, step: int, ranks: list[int], reason: str, latest: str | None):
        self.step = step
        self.ranks = ranks
        self.latest = latest
        kept = f"the latest checkpoint stays {latest}" if latest else "no checkpoint was written yet"
        super().__init__(f"step {step}: non-finite loss on rank(s) {', '.join(map(str, ranks))}; {reason}. "
                         f"Stopped without saving this step; {kept}.")


def get_stop_reason(policy: str, num_skipped: int, max_skips: int) -> str | None:
    """Why the run stops at a non-finite step; None when the step's update is skipped instead."""
    if policy == "stop":
        return "train.nonfinite_loss=stop"
    if num_skipped >= max_skips:
        return (f"train.nonfinite_loss=skip, but the run has skipped train.max_nonfinite_skips={max_skips} "
                "steps already")
    return None


def poison(loss):
    """The loss whose backward makes every gradient NaN (and so the step an overflow)."""
    return loss * float("nan")


def write_marker(run_dir: Path, err: NonFiniteLoss) -> None:
    record = {"step": err.step, "ranks": err.ranks, "checkpoint": err.latest, "exit_code": EXIT_NONFINITE_LOSS,
              "message": str(err), "time": time.time()}
    markers.write(run_dir, MARKER, record)


def read_marker(run_dir: Path) -> dict | None:
    return markers.read(run_dir, MARKER)


def clear_marker(run_dir: Path) -> None:
    markers.clear(run_dir, MARKER)
