"""One unit of the docs stage: read -> normalise -> filter -> hash, into the unit's own directory.

A unit writes into `u-NNNNNN.tmp-<pid>/` and renames it to `u-NNNNNN/` when complete, so a
unit directory that exists is finished (that is its completion marker) and a worker killed
at any moment leaves at most a `.tmp-*` directory that the next run deletes.

    u-NNNNNN/docs.arrow      cleaned documents that passed the filters (DOCS_SCHEMA)
    u-NNNNNN/hashes.npy      their 16-byte text hashes, sorted, with row numbers (dedup.write_hashes)
    u-NNNNNN/minhash.npy     MinHash signatures, when near-dup removal is on
    u-NNNNNN/tokens.bin      with a given tokenizer: the kept documents' ids, each followed by EOS (int32)
    u-NNNNNN/lengths.bin     ... and each document's id count including its EOS (int32)
    u-NNNNNN/rejects.jsonl   every record that could not be read, with file:line or byte offset
    u-NNNNNN/stats.json      counts in/out, bytes, drops by reason, wall time
"""
from __future__ import annotations

import importlib.abc
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep.clean import build_normalizer
from data_prep.config import DataConfig
from data_prep.dedup import minhash_signature, text_hash, write_hashes, write_signatures
from data_prep.documents import DOCS_SCHEMA, DocBuffer
from data_prep.filters import build_filters
from data_prep.readers import RawDoc, Reject, read_split
from data_prep.units import Unit

_EOS = np.array([1], dtype=np.int32)  # T5 layout EOS (data_prep.tokenizer.EOS_ID)

BATCH_ROWS = 1000


class UnitError(Exception):
    """A unit whose input could not be read at all (missing, unreadable, not the format)."""


@dataclass
class UnitStats:
    unit: int
    input: int
    file: str
    format: str
    num_docs_in: int = 0
    num_docs_out: int = 0
    text_bytes_in: int = 0
    text_bytes_out: int = 0
    num_rejected: int = 0
    num_bad_byte_lines: int = 0
    dropped: Counter = field(default_factory=Counter)
    wall_s: float = 0.0


class TokenSink:
    """Encodes a unit's kept documents as they are written, when the tokenizer is known up
    front (`tokenizer.path`): tokenizing inside the docs workers keeps every core busy and
    saves the tokens stage a second pass over the text."""

    def __init__(self, tmp_dir: Path, sp):
        self.sp = sp
        self.tokens = open(tmp_dir / "tokens.bin", "wb")
        self.lengths = open(tmp_dir / "lengths.bin", "wb")

    def add(self, batch: pa.RecordBatch) -> None:
        from data_prep.pack import iter_utf8

        texts = list(iter_utf8(batch.column("text")))
        encoded = self.sp.encode(texts, num_threads=1, return_type="numpy")  # one worker per core already
        lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int32, count=len(encoded))
        pieces = [_EOS] * (2 * len(encoded))
        pieces[::2] = encoded
        if pieces:
            self.tokens.write(np.concatenate(pieces).astype(np.int32, copy=False).tobytes())
        self.lengths.write(lengths.tobytes())

    def close(self) -> None:
        self.tokens.close()
        self.lengths.close()


class UnitWriter:
    """Everything one unit writes, in its temporary directory."""

    def __init__(self, tmp_dir: Path, near: bool, sp=None):
        self.tmp_dir = tmp_dir
        self._sink = pa.OSFile(str(tmp_dir / "docs.arrow"), "wb")
        self._writer = pa.ipc.new_stream(self._sink, DOCS_SCHEMA)
        self.rejects = open(tmp_dir / "rejects.jsonl", "w", encoding="utf-8")
        self.buffer = DocBuffer()
        self.hashes: list[bytes] = []  # 16 bytes per kept document: bounded by the unit's size
        self.signatures: list | None = [] if near else None
        self.token_sink = TokenSink(tmp_dir, sp) if sp is not None else None

    def add_reject(self, unit: Unit, reject: Reject) -> None:
        record = {"input": unit.input_index, "unit": unit.index, "where": reject.where, "reason": reject.reason}
        self.rejects.write(json.dumps(record, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        if len(self.buffer):
            batch = self.buffer.take()
            self._writer.write_batch(batch)
            if self.token_sink is not None:
                self.token_sink.add(batch)

    def close(self, stats: UnitStats) -> None:
        self.flush()
        self._writer.close()
        self._sink.close()
        self.rejects.close()
        if self.token_sink is not None:
            self.token_sink.close()
        write_hashes(self.tmp_dir / "hashes.npy", self.hashes)
        if self.signatures is not None:
            write_signatures(self.tmp_dir / "minhash.npy", self.signatures)
        stats_json = {**stats.__dict__, "dropped": dict(stats.dropped)}
        (self.tmp_dir / "stats.json").write_text(json.dumps(stats_json, ensure_ascii=False, indent=1) + "\n")


class UnitProcessor:
    """Cleans, filters and hashes the documents of units; one per worker process."""

    def __init__(self, data: DataConfig, spiece_path: Path | None = None):
        self.data = data
        self.sp = _load_sentencepiece(spiece_path) if spiece_path is not None else None  # once per worker
        self.normalize = build_normalizer(data.clean)
        self.filters = build_filters(data.filters)

    def run(self, unit: Unit, work_dir: Path) -> UnitStats:
        start = time.perf_counter()
        final_dir = work_dir / unit.name
        tmp_dir = work_dir / f"{unit.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
        stats = UnitStats(unit.index, unit.input_index, unit.path, unit.format)
        writer = UnitWriter(tmp_dir, self.data.dedup.near, self.sp)
        self._read_all(unit, writer, stats)
        stats.wall_s = time.perf_counter() - start
        writer.close(stats)
        _publish(tmp_dir, final_dir)
        return stats

    def _read_all(self, unit: Unit, writer: UnitWriter, stats: UnitStats) -> None:
        records = read_split(Path(unit.path), unit.format, unit.start, unit.end,
                             text_field=self.data.inputs[unit.input_index].text_field,
                             max_line_bytes=self.data.max_line_bytes)
        try:
            for item in records:
                if isinstance(item, Reject):
                    stats.num_rejected += 1
                    writer.add_reject(unit, item)
                else:
                    self._add_doc(unit, item, writer, stats)
                    if len(writer.buffer) >= BATCH_ROWS:
                        writer.flush()
        except (OSError, ValueError, EOFError) as err:
            # Readers turn bad records into rejects; what reaches here stops the whole unit.
            shutil.rmtree(writer.tmp_dir, ignore_errors=True)
            raise UnitError(f"{unit.path}: cannot be read as {unit.format}: {type(err).__name__}: {err}") from err

    def _add_doc(self, unit: Unit, raw: RawDoc, writer: UnitWriter, stats: UnitStats) -> None:
        stats.num_docs_in += 1
        stats.num_bad_byte_lines += raw.num_bad_byte_lines
        stats.text_bytes_in += len(raw.text.encode("utf-8"))
        text = self.normalize(raw.text)
        meta = raw.meta or {}
        for doc_filter in self.filters:
            if not doc_filter.keep(text, meta):
                stats.dropped[doc_filter.reason] += 1
                return
        local_id = raw.doc_id if raw.doc_id is not None else f"{unit.index:06d}-{stats.num_docs_out:07d}"
        writer.buffer.add(f"{unit.source}:{local_id}", unit.source, raw, text)
        writer.hashes.append(text_hash(text))
        if writer.signatures is not None:
            dedup = self.data.dedup
            writer.signatures.append(minhash_signature(text, dedup.num_perm, dedup.shingle_chars))
        stats.num_docs_out += 1
        stats.text_bytes_out += len(text.encode("utf-8"))


def _load_sentencepiece(path: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def _publish(tmp_dir: Path, final_dir: Path) -> None:
    """Atomic: the unit is visible complete or not at all. Another task may have finished the
    same unit meanwhile (both outputs are identical); then ours is dropped."""
    try:
        tmp_dir.rename(final_dir)
    except OSError:
        if not final_dir.is_dir():
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)


# Worker processes build their processor once (the normaliser and filters are not free to set up).
_PROCESSOR: UnitProcessor | None = None


def init_worker(data_json: str, spiece_path: str | None = None, child_process: bool = False) -> None:
    global _PROCESSOR
    if child_process:
        _probe_pandas_without_importing()
    _PROCESSOR = UnitProcessor(DataConfig.model_validate_json(data_json), Path(spiece_path) if spiece_path else None)


class _RefusePandas(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "pandas":
            raise ImportError("pandas is not used by data-prep workers")
        return None


def _probe_pandas_without_importing() -> None:
    """pyarrow imports pandas (~0.5 s of CPU) the first time a process builds an array from
    Python lists, only to ask whether they are pandas objects, which a worker never has. Let
    that one probe fail fast: pyarrow then skips the question in this worker. (If pandas is
    already imported, as after a fork from a process that used it, nothing changes.)"""
    finder = _RefusePandas()
    sys.meta_path.insert(0, finder)
    try:
        pa.array([""])
    finally:
        sys.meta_path.remove(finder)


def run_unit(unit: Unit, work_dir: str) -> dict:
    """Pool entry point: the unit's stats, or {"error": ...} for an unreadable input."""
    try:
        stats = _PROCESSOR.run(unit, Path(work_dir))
    except UnitError as err:
        return {"unit": unit.index, "input": unit.input_index, "error": str(err)}
    return {**stats.__dict__, "dropped": dict(stats.dropped)}
