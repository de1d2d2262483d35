"""The data-prep pipeline: docs → tokenizer → tokens, each stage atomic and skippable.

A stage builds into `<stage_dir>.tmp`, writes `manifest.json`, then its `_SUCCESS` marker
(holding the stage's parameters as JSON), then renames the directory into place: a killed
run never leaves a partial stage visible, and a rerun skips every stage whose marker
matches the current parameters. A rebuilt stage forces every later stage to rebuild.
"""
from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from data_prep import layout
from data_prep.config import DataConfig, TokenizerConfig
from data_prep.errors import UnreadableInputs
from data_prep.executor import TaskShare, prepare_work_dir, run_units
from data_prep.merge import merge_units
from data_prep.pack import (PREPACKED_DIR, adopt_prepacked, load_unit_keep, pack_tokens, pack_unit_tokens,
                            prepack_units)
from data_prep.shards import write_json
from data_prep.tokenizer import SPIECE_FILE, TokenizerCheck, build_tokenizer
from data_prep.units import Plan, get_plan_params, plan_units

MARKER = "_SUCCESS"


def normalize_params(params: dict) -> Any:
    return json.loads(json.dumps(params, sort_keys=True))


def run_stage(stage_dir: Path, params: dict, build: Callable[[Path], dict], force: bool, log) -> tuple[dict, bool]:
    """(manifest, skipped): reuse a finished stage with the same params, else rebuild it atomically."""
    marker = stage_dir / MARKER
    params = normalize_params(params)
    if not force and marker.is_file():
        if json.loads(marker.read_text(encoding="utf-8")) == params:
            return json.loads((stage_dir / "manifest.json").read_text(encoding="utf-8")), True
        log(f"{stage_dir.name}: parameters changed since it was built; rebuilding")
    tmp_dir = stage_dir.with_name(stage_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)  # left by a killed run
    tmp_dir.mkdir(parents=True)
    manifest = build(tmp_dir)
    write_json(tmp_dir / MARKER, params)
    shutil.rmtree(stage_dir, ignore_errors=True)
    tmp_dir.rename(stage_dir)
    return manifest, False


def get_docs_params(data: DataConfig, spiece: Path | None) -> dict:
    """What docs/ depends on: the units' inputs and settings, plus the merge's."""
    return {**get_plan_params(data, spiece), "shard_bytes": data.shard_bytes, "dedup": data.dedup.model_dump(),
            "max_rejected_share": data.max_rejected_share}


def check_inputs(data: DataConfig, pack_length: int) -> None:
    problems = data.find_problems()
    if pack_length <= 1:
        problems.append(("data.pack_length", f"must be > 1, got {pack_length}"))
    if problems:
        raise ValueError("invalid data config:\n" + "\n".join(f"  {path}: {msg}" for path, msg in problems))


def get_given_spiece(tokenizer: TokenizerConfig) -> Path | None:
    """The SentencePiece model known before the docs stage (tokenizer.path), if any: then the
    docs workers encode as they go (see worker.TokenSink)."""
    if tokenizer.path is None:
        return None
    path = Path(tokenizer.path) / SPIECE_FILE
    if not path.is_file():
        raise ValueError(f"tokenizer.path {tokenizer.path}: no {SPIECE_FILE} there")
    return path


def run_docs_units(data: DataConfig, plan: Plan, share: TaskShare, log, spiece: Path | None) -> float:
    """Run this task's share of the units; raise if an input could not be read. Returns wall seconds."""
    start = time.perf_counter()
    work_dir = layout.docs_work_dir(data.output_dir)
    prepare_work_dir(work_dir, data, plan.units, share, log, spiece)
    errors = run_units(plan.units, data, work_dir, share, log, spiece)
    problems = [f"input {i} {path}: {why}" for i, path, why in plan.unreadable]
    problems += [f"input {e['input']} (unit {e['unit']}): {e['error']}" for e in errors]
    if problems:
        raise UnreadableInputs("these inputs could not be read; fix or remove them and rerun "
                               "(finished units are kept):\n  " + "\n  ".join(problems))
    return time.perf_counter() - start


def build_docs(data: DataConfig, plan: Plan, out_dir: Path, log, spiece: Path | None = None,
               pack_length: int | None = None) -> dict:
    """All units (resuming finished ones), then the merge into `out_dir`. With `pack_length`,
    pre-encoded units are packed for the tokens stage while the merge writes the docs shards."""
    units_s = run_docs_units(data, plan, TaskShare(), log, spiece)
    work_dir = layout.docs_work_dir(data.output_dir)
    shutil.rmtree(work_dir / PREPACKED_DIR, ignore_errors=True)  # packed from an earlier merge's masks
    packing = functools.partial(packing_alongside, work_dir / PREPACKED_DIR, pack_length, data.shard_bytes) \
        if pack_length else None
    manifest = merge_units(work_dir, plan.units, plan.formats, data, out_dir, units_s, packing)
    for entry in manifest["inputs"]:
        log(f"docs: input {entry['input']} {entry['path']}: {entry['num_docs_out']} of {entry['num_docs_in']} kept")
    return manifest


def run_docs_task(data: DataConfig, share: TaskShare, log, spiece: Path | None) -> dict:
    """One Slurm array task: its share of the units, no merge (the merge job runs `t5ja prep`)."""
    plan = plan_units(data)
    wall_s = run_docs_units(data, plan, share, log, spiece)
    owned = [u for u in plan.units if share.owns(u)]
    log(f"docs: task {share.index} of {share.count}: {len(owned)} unit(s) done in {wall_s:.1f} s")
    return {"task": share.index, "num_tasks": share.count, "units": len(owned)}


def are_encoded(unit_dirs: list[Path]) -> bool:
    """Whether the docs workers encoded every unit (with tokenizer.path)."""
    return bool(unit_dirs) and all((d / "tokens.bin").is_file() for d in unit_dirs)


def list_encoded_units(work_dir: Path) -> list[Path]:
    """The unit directories, if the docs workers encoded every unit and the merge saved its
    keep mask; else []."""
    if not layout.keep_file(work_dir).is_file():
        return []
    unit_dirs = sorted(p for p in work_dir.glob("u-*") if p.is_dir() and "." not in p.name)
    return unit_dirs if are_encoded(unit_dirs) else []


@contextlib.contextmanager
def packing_alongside(packed_dir: Path, pack_length: int, shard_bytes: int, unit_dirs: list[Path],
                      keep: list[np.ndarray]):
    """Packs the pre-encoded units in a forked process while the docs merge writes its shards:
    both need only the keep masks, and the merge's copy and the packing each take one core."""
    if not are_encoded(unit_dirs):
        yield
        return
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        packed = pool.submit(prepack_units, unit_dirs, keep, pack_length, shard_bytes, packed_dir)
        yield
        packed.result()  # raises what the packing raised


def build_tokens(data: DataConfig, work_dir: Path, docs_dir: Path, spiece: Path, pack_length: int, out_dir: Path,
                 tok: dict, log) -> dict:
    """Adopt the windows packed during the docs merge; else pack the units the docs workers
    encoded, when they did (same windows); else encode docs/."""
    manifest = adopt_prepacked(work_dir / PREPACKED_DIR, pack_length, data.shard_bytes, tok["vocab_size"], out_dir)
    if manifest is not None:
        log("tokens: windows of the pre-encoded units, packed during the docs merge")
        return manifest
    unit_dirs = list_encoded_units(work_dir)
    if unit_dirs:
        log(f"tokens: packing {len(unit_dirs)} pre-encoded unit(s)")
        keep = load_unit_keep(layout.keep_file(work_dir), unit_dirs)
        return pack_unit_tokens(unit_dirs, keep, pack_length, out_dir, data.shard_bytes, tok["vocab_size"])
    return pack_tokens(docs_dir, spiece, pack_length, out_dir, data.shard_bytes, tok["vocab_size"])


def remove_work_dir(work_dir: Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)
    if work_dir.parent.is_dir() and not any(work_dir.parent.iterdir()):
        work_dir.parent.rmdir()


def run_prep(data: DataConfig, tokenizer: TokenizerConfig, pack_length: int, log=print,
             task_index: int | None = None, num_tasks: int | None = None) -> dict:
    """Run docs -> tokenizer -> tokens under `data.output_dir`; returns counts per stage.

    With a task index (or inside a Slurm array), run only that task's share of the docs units.
    """
    check_inputs(data, pack_length)
    share = TaskShare.from_env(task_index, num_tasks)
    spiece = get_given_spiece(tokenizer)
    if share.count > 1:
        return run_docs_task(data, share, log, spiece)
    docs_dir, tok_dir = layout.docs_dir(data.output_dir), layout.tokenizer_dir(data.output_dir)
    work_dir = layout.docs_work_dir(data.output_dir)
    # A given tokenizer is checked while the docs stage runs, not after it.
    with TokenizerCheck(spiece.parent) if spiece is not None else contextlib.nullcontext() as check:
        docs, docs_skipped = run_stage(
            docs_dir, get_docs_params(data, spiece),
            lambda tmp: build_docs(data, plan_units(data), tmp, log, spiece, pack_length),
            False, log,
        )
        tok, tok_skipped = run_stage(
            tok_dir, tokenizer.model_dump(),
            lambda tmp: build_tokenizer(docs_dir, tokenizer, tmp, log, check.result() if check else None),
            not docs_skipped, log,
        )
    tokens, tokens_skipped = run_stage(
        layout.tokens_dir(data.output_dir),
        {"pack_length": pack_length, "shard_bytes": data.shard_bytes},
        lambda tmp: build_tokens(data, work_dir, docs_dir, tok_dir / SPIECE_FILE, pack_length, tmp, tok, log),
        not tok_skipped, log,
    )
    remove_work_dir(work_dir)  # docs/ and tokens/ hold it all now
    summary = build_summary(docs, docs_skipped, tok, tok_skipped, tokens, tokens_skipped)
    log_summary(summary, log)
    return summary


def build_summary(docs: dict, docs_skipped: bool, tok: dict, tok_skipped: bool, tokens: dict, tokens_skipped: bool) -> dict:
    return {
        "docs": {**docs["totals"], "skipped": docs_skipped},
        "tokenizer": {key: tok[key] for key in ("vocab_size", "num_pieces", "num_sentinels")} | {"skipped": tok_skipped},
        "tokens": {key: tokens[key] for key in ("pack_length", "num_sequences", "num_tokens", "dropped_tail_tokens")}
        | {"num_shards": len(tokens["shards"]), "skipped": tokens_skipped},
    }


def log_summary(summary: dict, log) -> None:
    def note(stage: str) -> str:
        return " (already done)" if summary[stage]["skipped"] else ""

    docs, tok, tokens = summary["docs"], summary["tokenizer"], summary["tokens"]
    dropped = ", ".join(f"{reason} {n}" for reason, n in docs["dropped"].items())
    log(f"docs{note('docs')}: {docs['num_docs_out']} of {docs['num_docs_in']} kept ({dropped}; "
        f"rejected {docs['num_rejected']}) in {docs['num_shards']} shard(s)")
    log(f"tokenizer{note('tokenizer')}: {tok['num_pieces']} pieces + {tok['num_sentinels']} sentinels = {tok['vocab_size']}")
    log(f"tokens{note('tokens')}: {tokens['num_sequences']} x {tokens['pack_length']} tokens in {tokens['num_shards']} "
        f"shard(s), {tokens['dropped_tail_tokens']} tail tokens dropped")
    if tokens["num_sequences"] == 0:
        log(f"WARNING: the corpus is shorter than one window of {tokens['pack_length']} tokens; nothing to train on")
