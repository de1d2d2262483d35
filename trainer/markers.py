"""Stop markers: small JSON files in the run directory by which the workers tell the launcher
why they stopped (torchrun's own exit code is 1 whatever the workers returned). One mechanism
for every reason: preemption.py and nonfinite.py name their file and what goes in it."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write(run_dir: Path, name: str, record: dict) -> None:
    """Written whole or not at all (temp + rename): the launcher never reads half a marker."""
    tmp = run_dir / f"{name}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(run_dir / name)


def read(run_dir: Path, name: str) -> dict | None:
    path = run_dir / name
    return json.loads(path.read_text()) if path.is_file() else None


def clear(run_dir: Path, name: str) -> None:
    (run_dir / name).unlink(missing_ok=True)
