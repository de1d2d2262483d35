"""Fault injection: testing hooks that make the resilience paths run for real.

Set in the environment of `t5ja train` (torchrun passes it on to the workers); never in
production. Both act on the last rank only, so that the other ranks must learn of the fault
through the job's own mechanisms (torchrun's restart, the ranks' agreement on a bad loss).
Steps are numbered as they are logged: step N is the N-th optimizer step.

    T5JA_FAULT_CRASH_AT_STEP=N          the last rank SIGKILLs itself as it starts step N, in
                                        the first torchrun round only (TORCHELASTIC_RESTART_COUNT
                                        0), as a node's OOM killer would
    T5JA_FAULT_NONFINITE_AT_STEPS=N,M   the last rank's loss is NaN in steps N and M (its first
                                        micro batch), in every round
    T5JA_FAULT_CRASH_IN_SAVE=N          the last rank SIGKILLs itself in the middle of the save
                                        of step N: its DeepSpeed files are written, the other
                                        ranks wait at the barrier before the manifest; first
                                        torchrun round only
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import torch

from trainer.distributed import get_restart_count

log = logging.getLogger("trainer.faults")

CRASH_AT_STEP = "T5JA_FAULT_CRASH_AT_STEP"
NONFINITE_AT_STEPS = "T5JA_FAULT_NONFINITE_AT_STEPS"
CRASH_IN_SAVE = "T5JA_FAULT_CRASH_IN_SAVE"


@dataclass(frozen=True)
class Faults:
    crash_at_step: int | None = None
    nonfinite_at_steps: frozenset[int] = frozenset()
    crash_in_save: int | None = None

    @classmethod
    def from_env(cls, rank: int, world_size: int, env=os.environ) -> Faults:
        """The faults this rank injects: none unless it is the last rank and a hook is set."""
        if rank != world_size - 1:
            return cls()
        crash, in_save = env.get(CRASH_AT_STEP), env.get(CRASH_IN_SAVE)
        steps = env.get(NONFINITE_AT_STEPS, "")
        faults = cls(int(crash) if crash else None, frozenset(int(s) for s in steps.split(",") if s.strip()),
                     int(in_save) if in_save else None)
        if faults != cls():
            log.warning("fault injection on rank %d: %s", rank, faults)
        return faults

    def maybe_crash(self, step: int) -> None:
        if step == self.crash_at_step and get_restart_count() == 0:
            log.warning("%s=%d: killing this rank (SIGKILL)", CRASH_AT_STEP, step)
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_crash_in_save(self, step: int) -> None:
        if step == self.crash_in_save and get_restart_count() == 0:
            log.warning("%s=%d: killing this rank in the middle of the save (SIGKILL)", CRASH_IN_SAVE, step)
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_nonfinite(self, loss: torch.Tensor, step: int, micro_step: int) -> torch.Tensor:
        if step in self.nonfinite_at_steps and micro_step == 0:
            log.warning("%s: loss of step %d made NaN", NONFINITE_AT_STEPS, step)
            return loss * float("nan")  # stays in the graph: backward yields NaN gradients, as a real one
        return loss
