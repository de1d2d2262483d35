"""The data-prep executor: docs → tokenizer → tokens, each stage atomic and skippable.

A stage builds into `<stage_dir>.tmp`, writes `manifest.json`, then its `_SUCCESS` marker
(holding the stage's parameters as JSON), then renames the directory into place: a killed
run never leaves a partial stage visible, and a rerun skips every stage whose marker
matches the current parameters. A rebuilt stage forces every later stage to rebuild.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from data_prep import layout
from data_prep.clean import build_filters, clean_text
from data_prep.config import DataConfig, InputSpec, TokenizerConfig, resolve_input_files
from data_prep.pack import pack_tokens
from data_prep.readers import RawDoc, Reject, read_file
from data_prep.shards import ShardWriter, write_json
from data_prep.tokenizer import SPIECE_FILE, build_tokenizer

DOCS_SCHEMA = pa.schema([(name, pa.string()) for name in ("id", "source", "title", "url", "text")])
DOC_BATCH_ROWS = 1000
MARKER = "_SUCCESS"


def get_source_name(path: Path) -> str:
    """File name up to its first dot: 'ja.txt.xz' → 'ja'."""
    return path.name.split(".")[0]


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


class DocsBuilder:
    """Reads every input, cleans and filters documents, and writes the docs shards."""

    def __init__(self, data: DataConfig, out_dir: Path):
        self.out_dir = out_dir
        self.writer = ShardWriter(out_dir, DOCS_SCHEMA, data.shard_bytes)
        self.filters = build_filters(data.min_chars)
        self.columns: dict[str, list[str]] = {name: [] for name in DOCS_SCHEMA.names}
        self.num_ids: Counter[str] = Counter()
        self.rejects = open(out_dir / "rejects.jsonl", "w", encoding="utf-8")

    def add_input(self, index: int, spec: InputSpec) -> dict:
        files = resolve_input_files(spec)
        stats = new_input_stats(index, spec, files)
        for path in files:
            source = spec.source or get_source_name(path)
            stats["sources"].append(source)
            for item in read_file(path, spec.format, spec.text_field):
                if isinstance(item, Reject):
                    self.add_reject(index, item, stats)
                else:
                    self.add_doc(item, source, stats)
        stats["sources"] = sorted(set(stats["sources"]))
        return stats

    def add_reject(self, index: int, reject: Reject, stats: dict) -> None:
        stats["num_rejected"] += 1
        line = {"input": index, "where": reject.where, "reason": reject.reason}
        self.rejects.write(json.dumps(line, ensure_ascii=False) + "\n")

    def add_doc(self, raw: RawDoc, source: str, stats: dict) -> None:
        stats["num_docs_in"] += 1
        stats["text_bytes_in"] += len(raw.text.encode("utf-8"))
        stats["num_bad_byte_lines"] += raw.num_bad_byte_lines
        text = clean_text(raw.text)
        for doc_filter in self.filters:
            if not doc_filter.keep(text):
                stats["dropped"][doc_filter.reason] += 1
                return
        stats["num_docs_out"] += 1
        stats["text_bytes_out"] += len(text.encode("utf-8"))
        self.num_ids[source] += 1
        doc_id = f"{source}:{raw.doc_id if raw.doc_id is not None else self.num_ids[source] - 1}"
        for name, value in zip(DOCS_SCHEMA.names, (doc_id, source, raw.title, raw.url, text)):
            self.columns[name].append(value)
        if len(self.columns["text"]) >= DOC_BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.columns["text"]:
            self.writer.write(pa.RecordBatch.from_pydict(self.columns, schema=DOCS_SCHEMA))
            self.columns = {name: [] for name in DOCS_SCHEMA.names}

    def finish(self, inputs: list[dict]) -> dict:
        self.flush()
        self.rejects.close()
        shards = self.writer.close()
        manifest = {"schema": DOCS_SCHEMA.names, "shards": shards, "inputs": inputs, "totals": sum_input_stats(inputs)}
        manifest["totals"].update(num_shards=len(shards), shard_bytes=sum(s["bytes"] for s in shards))
        write_json(self.out_dir / "manifest.json", manifest)
        return manifest


def new_input_stats(index: int, spec: InputSpec, files: list[Path]) -> dict:
    return {
        "input": index, "path": spec.path, "format": spec.format, "files": [str(f) for f in files], "sources": [],
        "num_docs_in": 0, "num_docs_out": 0, "text_bytes_in": 0, "text_bytes_out": 0,
        "dropped": Counter({"too_short": 0, "duplicate": 0}), "num_rejected": 0, "num_bad_byte_lines": 0,
    }


def sum_input_stats(inputs: list[dict]) -> dict:
    keys = ("num_docs_in", "num_docs_out", "text_bytes_in", "text_bytes_out", "num_rejected", "num_bad_byte_lines")
    totals: dict[str, Any] = {key: sum(stats[key] for stats in inputs) for key in keys}
    totals["dropped"] = {}
    for stats in inputs:
        stats["dropped"] = dict(stats["dropped"])
        for reason, count in stats["dropped"].items():
            totals["dropped"][reason] = totals["dropped"].get(reason, 0) + count
    return totals


def build_docs(data: DataConfig, out_dir: Path, log=print) -> dict:
    builder = DocsBuilder(data, out_dir)
    inputs = []
    for index, spec in enumerate(data.inputs):
        inputs.append(builder.add_input(index, spec))
        log(f"docs: input {index} {spec.path}: {inputs[-1]['num_docs_out']} of {inputs[-1]['num_docs_in']} kept")
    return builder.finish(inputs)


def get_docs_params(data: DataConfig) -> dict:
    """What the docs stage depends on: the inputs (with file sizes, to notice a changed corpus) and cleaning."""
    files = [[{"path": str(p), "bytes": p.stat().st_size} for p in resolve_input_files(s)] for s in data.inputs]
    inputs = [spec.model_dump() for spec in data.inputs]
    return {"inputs": inputs, "files": files, "shard_bytes": data.shard_bytes, "min_chars": data.min_chars}


def check_inputs(data: DataConfig, pack_length: int) -> None:
    problems = data.find_problems()
    if pack_length <= 1:
        problems.append(("data.pack_length", f"must be > 1, got {pack_length}"))
    if problems:
        raise ValueError("invalid data config:\n" + "\n".join(f"  {path}: {msg}" for path, msg in problems))


def run_prep(data: DataConfig, tokenizer: TokenizerConfig, pack_length: int, log=print) -> dict:
    """Run docs → tokenizer → tokens under `data.output_dir`; returns counts per stage."""
    check_inputs(data, pack_length)
    docs_dir, tok_dir = layout.docs_dir(data.output_dir), layout.tokenizer_dir(data.output_dir)
    docs, docs_skipped = run_stage(
        docs_dir, get_docs_params(data), lambda tmp: build_docs(data, tmp, log), False, log
    )
    tok, tok_skipped = run_stage(
        tok_dir, tokenizer.model_dump(), lambda tmp: build_tokenizer(docs_dir, tokenizer, tmp, log),
        not docs_skipped, log,
    )
    tokens, tokens_skipped = run_stage(
        layout.tokens_dir(data.output_dir),
        {"pack_length": pack_length, "shard_bytes": data.shard_bytes},
        lambda tmp: pack_tokens(docs_dir, tok_dir / SPIECE_FILE, pack_length, tmp, data.shard_bytes, tok["vocab_size"]),
        not tok_skipped, log,
    )
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
