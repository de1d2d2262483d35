"""A process's garbage collector during its start-up (a rank's, or a `t5ja` command's).

A rank's start-up creates ~600k objects that live as long as the process: the modules,
classes and functions of torch, DeepSpeed, transformers and MLflow, then the model and the
engine. While they pile up, CPython's automatic full collections walk every one of them again
each time the heap grows by a quarter (~9 passes) and DeepSpeed's ZeRO-3 init adds one more
(gc.collect in its defragment): 2-4 s of CPU per rank at every start and restart on 2 CPU
cores, finding next to nothing. So a worker starts with automatic collection off
(trainer/__main__.py), and `settle` collects once and freezes the survivors (gc.freeze: later
passes skip them) before ZeRO init and before the first step, where collection comes back on
for the loop. The start-up's cyclic garbage is still freed, by the collect of each settle.
"""

from __future__ import annotations

import contextlib
import gc


def pause_collection() -> None:
    gc.disable()


def settle(resume_collection: bool = False) -> None:
    """Frees the cyclic garbage so far, then moves every survivor out of the collector's view."""
    gc.collect()  # before the freeze: garbage frozen would never be freed
    gc.freeze()
    if resume_collection:
        gc.enable()


@contextlib.contextmanager
def collection_paused():
    """No automatic collection inside (a command's torch/transformers/DeepSpeed imports: the
    same ~2 s of CPU of passes over module objects that live on), then `settle`, with automatic
    collection as it was before (off in a rank that has not reached its first step yet)."""
    was_enabled = gc.isenabled()
    pause_collection()
    try:
        yield
    finally:
        settle(resume_collection=was_enabled)
