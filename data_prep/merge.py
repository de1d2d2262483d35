"""The docs stage's merge: corpus-wide dedup over all units, resharding, manifest, rejects.

Runs once every unit is done (locally, or as the job that depends on a Slurm array). Units
are visited in their canonical order, so the kept copy of a duplicate is the same whatever
the number of workers or tasks that produced the units.
"""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from data_prep.config import DataConfig
from data_prep.dedup import NearDuplicateIndex, find_exact_duplicates, load_signatures
from data_prep.documents import DOCS_SCHEMA
from data_prep.errors import RejectedShareExceeded
from data_prep.layout import keep_file
from data_prep.shards import ShardWriter, write_json
from data_prep.units import Unit

STAT_KEYS = ("num_docs_in", "num_docs_out", "text_bytes_in", "text_bytes_out", "num_rejected", "num_bad_byte_lines")


def load_unit_stats(work_dir: Path, units: list[Unit]) -> list[dict]:
    return [json.loads((work_dir / u.name / "stats.json").read_text()) for u in units]


def get_drop_masks(work_dir: Path, units: list[Unit], stats: list[dict], data: DataConfig) -> tuple[list, list]:
    """Per unit: (exact-duplicate mask, near-duplicate mask), True = drop."""
    rows = [s["num_docs_out"] for s in stats]
    if data.dedup.exact:
        exact = find_exact_duplicates([work_dir / u.name / "hashes.npy" for u in units], rows)
    else:
        exact = [np.zeros(n, dtype=bool) for n in rows]
    near = [np.zeros(n, dtype=bool) for n in rows]
    if data.dedup.near:
        index = NearDuplicateIndex(data.dedup.near_threshold, data.dedup.num_perm)
        for unit, unit_exact, unit_near in zip(units, exact, near):
            signatures = load_signatures(work_dir / unit.name / "minhash.npy")
            for row in np.flatnonzero(~unit_exact):
                unit_near[row] = index.is_duplicate_or_add(f"{unit.index}:{row}", signatures[row])
    return exact, near


def save_keep_masks(work_dir: Path, keep: list[np.ndarray]) -> None:
    """The units' keep masks, one after the other in one file (layout.keep_file)."""
    np.save(keep_file(work_dir), np.concatenate([np.zeros(0, dtype=bool), *keep]))


def write_docs(work_dir: Path, units: list[Unit], keep: list[np.ndarray], out_dir: Path, shard_bytes: int) -> list:
    """Kept rows of every unit, in canonical order, into shards of `shard_bytes`."""
    writer = ShardWriter(out_dir, DOCS_SCHEMA, shard_bytes)
    for unit, unit_keep in zip(units, keep):
        offset = 0
        # Batch by batch from a memory map: no copy of what is read, and memory stays one batch
        # (pages of the page cache), whatever the unit's size.
        with pa.memory_map(str(work_dir / unit.name / "docs.arrow")) as source:
            for batch in pa.ipc.open_stream(source):
                batch_keep = unit_keep[offset:offset + batch.num_rows]
                offset += batch.num_rows
                if not batch_keep.all():  # filter() copies every column, even when it keeps every row
                    batch = batch.filter(bool_array(batch_keep))
                writer.write(batch, origin=unit.input_index)
    return writer.close()


def bool_array(mask: np.ndarray) -> pa.BooleanArray:
    """`pa.array(mask)` without its first-call import of pandas (~0.5 s in the merge process)."""
    bits = np.packbits(mask, bitorder="little")
    return pa.Array.from_buffers(pa.bool_(), len(mask), [None, pa.py_buffer(bits)])


def merge_rejects(work_dir: Path, units: list[Unit], out_path: Path) -> None:
    with open(out_path, "wb") as out:
        for unit in units:
            with open(work_dir / unit.name / "rejects.jsonl", "rb") as f:
                shutil.copyfileobj(f, out)


def summarize_inputs(data: DataConfig, formats: dict, units: list[Unit], stats: list[dict], exact: list,
                     near: list) -> list[dict]:
    inputs = [{"input": i, "path": spec.path, "format": _format_of(spec.format, formats.get(i, [])),
               "sources": set(), "files": set(), **{k: 0 for k in STAT_KEYS}, "dropped": Counter()}
              for i, spec in enumerate(data.inputs)]
    for unit, unit_stats, unit_exact, unit_near in zip(units, stats, exact, near):
        entry = inputs[unit.input_index]
        entry["files"].add(unit.path)
        entry["sources"].add(unit.source)
        for key in STAT_KEYS:
            entry[key] += unit_stats[key]
        entry["dropped"].update(unit_stats["dropped"])
        entry["dropped"]["duplicate"] += int(unit_exact.sum())
        entry["dropped"]["near_duplicate"] += int(unit_near.sum())
        entry["num_docs_out"] -= int(unit_exact.sum() + unit_near.sum())
    return [_finish_entry(entry) for entry in inputs]


def _format_of(declared: str, detected: list[str]) -> str:
    if declared != "auto":
        return declared
    kinds = sorted(set(detected))
    return kinds[0] if len(kinds) == 1 else ",".join(kinds) or "auto"


def _finish_entry(entry: dict) -> dict:
    entry["files"] = sorted(entry["files"])
    entry["sources"] = sorted(entry["sources"])
    entry["dropped"] = dict(sorted(entry["dropped"].items()))
    records = entry["num_docs_in"] + entry["num_rejected"]
    entry["rejected_share"] = entry["num_rejected"] / records if records else 0.0
    return entry


def get_totals(inputs: list[dict], shards: list[dict]) -> dict:
    totals = {key: sum(entry[key] for entry in inputs) for key in STAT_KEYS}
    dropped: Counter = Counter()
    for entry in inputs:
        dropped.update(entry["dropped"])
    totals["dropped"] = dict(sorted(dropped.items()))
    totals.update(num_shards=len(shards), shard_bytes=sum(s["bytes"] for s in shards),
                  num_rows=sum(s["rows"] for s in shards))
    return totals


def check_rejected_share(inputs: list[dict], max_share: float) -> None:
    bad = [e for e in inputs if e["rejected_share"] > max_share]
    if bad:
        lines = [f"input {e['input']} ({e['path']}): {e['num_rejected']} of {e['num_docs_in'] + e['num_rejected']} "
                 f"records rejected ({e['rejected_share']:.1%} > data.max_rejected_share {max_share:.1%}); "
                 "see rejects.jsonl" for e in bad]
        raise RejectedShareExceeded("\n".join(lines))


def merge_units(work_dir: Path, units: list[Unit], formats: dict, data: DataConfig, out_dir: Path,
                units_wall_s: float,
                alongside: Callable[[list[Path], list[np.ndarray]], AbstractContextManager] | None = None) -> dict:
    """Build the final docs/ contents in `out_dir` from finished units; returns the manifest.

    `alongside(unit_dirs, keep_masks)` is entered once the keep masks are known and saved, and
    exited when the shards are written: work that needs the masks, run in another process
    meanwhile (pipeline.py packs the pre-encoded tokens)."""
    start = time.perf_counter()
    stats = load_unit_stats(work_dir, units)
    exact, near = get_drop_masks(work_dir, units, stats, data)
    inputs = summarize_inputs(data, formats, units, stats, exact, near)
    merge_rejects(work_dir, units, out_dir / "rejects.jsonl")
    check_rejected_share(inputs, data.max_rejected_share)
    keep = [~(e | n) for e, n in zip(exact, near)]
    save_keep_masks(work_dir, keep)
    with alongside([work_dir / unit.name for unit in units], keep) if alongside else nullcontext():
        shards = write_docs(work_dir, units, keep, out_dir, data.shard_bytes)
    totals = get_totals(inputs, shards)
    merge_s = time.perf_counter() - start
    totals.update(units_wall_s=round(units_wall_s, 3), merge_wall_s=round(merge_s, 3),
                  throughput_mb_s=round(totals["text_bytes_in"] / 1e6 / max(units_wall_s + merge_s, 1e-9), 3))
    manifest = {"schema": DOCS_SCHEMA.names, "shards": shards, "inputs": inputs,
                "units": len(units), "totals": totals}
    write_json(out_dir / "manifest.json", manifest)
    return manifest
