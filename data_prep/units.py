"""Units of work of the docs stage: a whole file, or a byte range of a large splittable one.

The plan is a pure function of the inputs (paths, sizes, formats) and `unit_bytes`, so every
worker, rerun and Slurm array task computes the same units, in the same canonical order
(input order, then file order, then byte order). That order decides which copy of a
duplicate document is kept.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from data_prep.config import DataConfig, InputSpec, resolve_input_files
from data_prep.dedup import HASH_NAME
from data_prep.readers import detect_format, plan_splits
from data_prep.shards import get_sha256


@dataclass(frozen=True)
class Unit:
    index: int  # position in the canonical order
    input_index: int  # which data.inputs entry it comes from
    path: str
    format: str  # the detected or declared format
    start: int  # byte range [start, end) of the file; end None = to the end
    end: int | None
    source: str

    @property
    def name(self) -> str:
        return f"u-{self.index:06d}"


@dataclass
class Plan:
    units: list[Unit]
    unreadable: list[tuple[int, str, str]]  # (input index, path, why) of files that cannot even be opened
    formats: dict[int, list[str]]  # input index -> detected formats of its files


def get_source_name(path: Path) -> str:
    """File name up to its first dot: 'ja.txt.xz' -> 'ja'."""
    return path.name.split(".")[0]


def _file_units(index0: int, input_index: int, spec: InputSpec, path: Path, fmt: str, unit_bytes: int) -> list[Unit]:
    source = spec.source or get_source_name(path)
    splits = plan_splits(path, fmt, unit_bytes)
    return [Unit(index0 + i, input_index, str(path), fmt, start, end, source) for i, (start, end) in enumerate(splits)]


# Aim for at least this many units, so that a small corpus still keeps every worker busy and
# the last unit to finish does not leave the others idle for long.
MIN_UNITS = 64
# ... but no smaller than this (or than max_line_bytes, if that is smaller): each unit costs a
# few milliseconds of its own (files, stats, a merge step).
MIN_AUTO_UNIT_BYTES = 2 * 2**20


def get_unit_bytes(data: DataConfig) -> int:
    """data.unit_bytes, smaller for small corpora: a pure function of the inputs (never of the
    number of workers), so every run and task plans the same units.

    An automatically shrunk unit may be smaller than max_line_bytes: a split finds its first
    record by looking back only to the previous newline, so only a unit cut inside a giant
    line pays for reading it (and then rejects or skips it, as any unit would).
    """
    total = sum(p.stat().st_size for spec in data.inputs for p in resolve_input_files(spec))
    floor = min(MIN_AUTO_UNIT_BYTES, data.max_line_bytes)
    return max(floor, min(data.unit_bytes, -(-total // MIN_UNITS)))


def plan_units(data: DataConfig) -> Plan:
    plan = Plan([], [], {})
    unit_bytes = get_unit_bytes(data)
    for input_index, spec in enumerate(data.inputs):
        plan.formats[input_index] = []
        for path in resolve_input_files(spec):
            try:
                fmt = detect_format(path) if spec.format == "auto" else spec.format
                units = _file_units(len(plan.units), input_index, spec, path, fmt, unit_bytes)
            except (OSError, ValueError, EOFError) as err:
                plan.unreadable.append((input_index, str(path), f"{type(err).__name__}: {err}"))
                continue
            plan.formats[input_index].append(fmt)
            plan.units.extend(units)
    return plan


def get_plan_params(data: DataConfig, spiece_path: Path | None = None) -> dict:
    """What the per-unit outputs depend on: change any of it and the units are redone."""
    files = [[{"path": str(p), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
              for p in resolve_input_files(spec)] for spec in data.inputs]
    return {
        "inputs": [spec.model_dump() for spec in data.inputs], "files": files, "unit_bytes": data.unit_bytes,
        "max_line_bytes": data.max_line_bytes, "clean": data.clean.model_dump(), "filters": data.filters.model_dump(),
        "near": data.dedup.model_dump() if data.dedup.near else None,
        "spiece_sha256": get_sha256(spiece_path) if spiece_path else None, "hash": HASH_NAME,
    }


def get_params_digest(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def units_to_json(units: list[Unit]) -> list[dict]:
    return [asdict(u) for u in units]
