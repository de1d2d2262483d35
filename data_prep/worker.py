"""One unit of the docs stage: read -> normalise -> filter -> hash, into the unit's own directory.

A unit writes into `u-NNNNNN.tmp-<pid>/` and renames it to `u-NNNNNN/` when complete, so a
unit directory that exists is finished (that is its completion marker) and a worker killed
at any moment leaves at most a `.tmp-*` directory that the next run deletes.

    u-NNNNNN/docs.arrow      cleaned documents that passed the filters (DOCS_SCHEMA)
    u-NNNNNN/hashes.npy      their 16-byte text hashes, sorted, with row numbers (dedup.write_hashes)
    u-NNNNNN/minhash.npy     MinHash signatures, when near-dup removal is on
    u-NNNNNN/tokens.bin      with a given tokenizer: the kept documents' ids, each followed by EOS (int32);
                             a repeat of an earlier text of the unit is EOS alone (exact dedup drops it)
    u-NNNNNN/lengths.bin     ... and each document's id count including its EOS (int32)
    u-NNNNNN/rejects.jsonl   every record that could not be read, with file:line or byte offset
    u-NNNNNN/stats.json      counts in/out, bytes, drops by reason, wall time
"""
from __future__ import annotations

import contextlib
import importlib.abc
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.clean import build_column_normalizer
from data_prep.config import DataConfig
from data_prep.dedup import minhash_signature, utf8_hash, write_hashes, write_signatures
from data_prep.documents import DOCS_SCHEMA, build_docs_batch
from data_prep.filters import apply_filters, build_filters
from data_prep.pack import UNIT_IDS_DTYPE, iter_utf8, join_with_eos
from data_prep.json_blocks import DocBatch
from data_prep.readers import RawDoc, Reject, read_split_batches
from data_prep.units import Unit

BATCH_ROWS = 1000
BATCH_CHARS = 8 * 2**20  # bounds a batch's memory when documents are long


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

    def __init__(self, tmp_dir: Path, encoder):
        self.encoder = encoder
        self.tokens = open(tmp_dir / "tokens.bin", "wb")
        self.lengths = open(tmp_dir / "lengths.bin", "wb")

    def add(self, texts: list[bytes]) -> None:
        encoded = self.encoder.encode(texts, num_threads=1)  # one worker per core already
        lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=UNIT_IDS_DTYPE, count=len(encoded))
        # written from the arrays' own buffers: a tobytes() copy costs fresh pages
        self.tokens.write(join_with_eos(encoded).data)
        self.lengths.write(lengths.data)

    def close(self) -> None:
        self.tokens.close()
        self.lengths.close()


class UnitWriter:
    """Everything one unit writes, in its temporary directory."""

    def __init__(self, tmp_dir: Path, near: bool, encoder=None, exact: bool = True):
        self.tmp_dir = tmp_dir
        self._sink = pa.OSFile(str(tmp_dir / "docs.arrow"), "wb")
        self._writer = pa.ipc.new_stream(self._sink, DOCS_SCHEMA)
        self.rejects = open(tmp_dir / "rejects.jsonl", "w", encoding="utf-8")
        self.hashes: list[bytes] = []  # 16 bytes per kept document: bounded by the unit's size
        self.signatures: list | None = [] if near else None
        self.token_sink = TokenSink(tmp_dir, encoder) if encoder is not None else None
        # With exact dedup the merge drops every repeat of an earlier text, so a repeat within
        # the unit need not be encoded: it is written as an empty document (EOS alone), never packed.
        self._seen: set[bytes] | None = set() if exact and encoder is not None else None

    def add_reject(self, unit: Unit, reject: Reject) -> None:
        record = {"input": unit.input_index, "unit": unit.index, "where": reject.where, "reason": reject.reason}
        self.rejects.write(json.dumps(record, ensure_ascii=False) + "\n")

    def add(self, batch: pa.RecordBatch, utf8: list[bytes]) -> None:
        """Kept documents, with the UTF-8 bytes of their texts (hashed, and encoded if a tokenizer is given)."""
        self._writer.write_batch(batch)
        hashes = list(map(utf8_hash, utf8))
        self.hashes.extend(hashes)
        if self.token_sink is not None:
            self.token_sink.add(utf8 if self._seen is None else self._blank_repeats(hashes, utf8))

    def _blank_repeats(self, hashes: list[bytes], utf8: list[bytes]) -> list[bytes]:
        texts = []
        for digest, text in zip(hashes, utf8):
            texts.append(b"" if digest in self._seen else text)
            self._seen.add(digest)
        return texts

    def close(self, stats: UnitStats) -> None:
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
    """Cleans, filters and hashes the documents of units; one per worker process.

    Documents go through in batches (BATCH_ROWS, or BATCH_CHARS of text): cleaning and the
    length filters run on whole Arrow columns, and a cleaned text stays Arrow (UTF-8) on its
    way to the docs file, the hash and the tokenizer: no Python string per cleaned document.
    """

    def __init__(self, data: DataConfig, spiece_path: Path | None = None):
        self.data = data
        self.encoder = _load_encoder(spiece_path) if spiece_path is not None else None  # before the fork: shared
        self.normalize = build_column_normalizer(data.clean)
        self.filters = build_filters(data.filters)

    def run(self, unit: Unit, work_dir: Path) -> UnitStats:
        start = time.perf_counter()
        final_dir = work_dir / unit.name
        tmp_dir = work_dir / f"{unit.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
        stats = UnitStats(unit.index, unit.input_index, unit.path, unit.format)
        writer = UnitWriter(tmp_dir, self.data.dedup.near, self.encoder, self.data.dedup.exact)
        self._read_all(unit, writer, stats)
        stats.wall_s = time.perf_counter() - start
        writer.close(stats)
        _publish(tmp_dir, final_dir)
        return stats

    def _read_all(self, unit: Unit, writer: UnitWriter, stats: UnitStats) -> None:
        records = read_split_batches(Path(unit.path), unit.format, unit.start, unit.end,
                                     text_field=self.data.inputs[unit.input_index].text_field,
                                     max_line_bytes=self.data.max_line_bytes)
        batch: list[RawDoc] = []
        batch_chars = 0
        try:
            for item in records:
                if isinstance(item, Reject):
                    stats.num_rejected += 1
                    writer.add_reject(unit, item)
                    continue
                if isinstance(item, DocBatch):  # already columns: after the documents before it
                    if batch:
                        self._add_batch(unit, DocColumns.from_raws(batch), writer, stats)
                        batch, batch_chars = [], 0
                    self._add_batch(unit, DocColumns.from_batch(item), writer, stats)
                    continue
                batch.append(item)
                batch_chars += len(item.text)
                if len(batch) >= BATCH_ROWS or batch_chars >= BATCH_CHARS:
                    self._add_batch(unit, DocColumns.from_raws(batch), writer, stats)
                    batch, batch_chars = [], 0
            if batch:
                self._add_batch(unit, DocColumns.from_raws(batch), writer, stats)
        except (OSError, ValueError, EOFError) as err:
            # Readers turn bad records into rejects; what reaches here stops the whole unit.
            shutil.rmtree(writer.tmp_dir, ignore_errors=True)
            raise UnitError(f"{unit.path}: cannot be read as {unit.format}: {type(err).__name__}: {err}") from err

    def _add_batch(self, unit: Unit, docs: DocColumns, writer: UnitWriter, stats: UnitStats) -> None:
        """Clean, filter and write a batch of documents, in reading order."""
        stats.num_docs_in += len(docs.texts)
        stats.num_bad_byte_lines += docs.num_bad_byte_lines
        stats.text_bytes_in += get_utf8_bytes(docs.texts)
        texts = self.normalize(docs.texts)
        keep, dropped = apply_filters(self.filters, texts, docs.metas or [{}] * len(texts))
        stats.dropped.update(dropped)
        rows = np.flatnonzero(keep).tolist()
        if not rows:
            return
        docs = replace(docs, texts=texts)  # the cleaned texts go on; the raw ones are done with
        if len(rows) < len(keep):
            docs = docs.take(rows)
        texts = docs.texts
        ids = [f"{unit.source}:{self._local_id(unit, doc_id, stats.num_docs_out + i)}" for i, doc_id in enumerate(docs.doc_ids)]
        utf8 = list(iter_utf8(texts))
        writer.add(build_docs_batch(ids, unit.source, docs.titles, docs.urls, docs.metas, texts), utf8)
        if writer.signatures is not None:
            dedup = self.data.dedup
            writer.signatures.extend(minhash_signature(text, dedup.num_perm, dedup.shingle_chars) for text in texts.to_pylist())
        stats.num_docs_out += len(rows)
        stats.text_bytes_out += sum(map(len, utf8))

    @staticmethod
    def _local_id(unit: Unit, doc_id: str | None, row_out: int) -> str:
        """The reader's id, else one from the unit and the document's row among those kept."""
        return doc_id if doc_id is not None else f"{unit.index:06d}-{row_out:07d}"


@dataclass
class DocColumns:
    """A batch of read documents, column by column: what cleaning, filters and the docs file take."""

    texts: pa.Array
    doc_ids: list[str | None]
    titles: pa.Array
    urls: pa.Array
    metas: list[dict] | None  # None: no reader metadata (all but OSCAR)
    num_bad_byte_lines: int = 0

    @classmethod
    def from_raws(cls, raws: list[RawDoc]) -> "DocColumns":
        metas = [raw.meta for raw in raws] if any(raw.meta for raw in raws) else None
        return cls(pa.array([raw.text for raw in raws], pa.string()), [raw.doc_id for raw in raws],
                   pa.array([raw.title for raw in raws], pa.string()), pa.array([raw.url for raw in raws], pa.string()),
                   metas, sum(raw.num_bad_byte_lines for raw in raws))

    @classmethod
    def from_batch(cls, batch: DocBatch) -> "DocColumns":
        return cls(batch.texts, batch.doc_ids, batch.titles, batch.urls, None)

    def take(self, rows: list[int]) -> "DocColumns":
        """The kept rows (num_bad_byte_lines stays the batch's: it counts what was read)."""
        indices = pa.array(rows, pa.int64())
        return DocColumns(self.texts.take(indices), [self.doc_ids[row] for row in rows], self.titles.take(indices),
                          self.urls.take(indices), None if self.metas is None else [self.metas[row] for row in rows],
                          self.num_bad_byte_lines)


def get_utf8_bytes(texts: pa.Array) -> int:
    """UTF-8 bytes of all the strings of an Arrow string column (no Python string per document)."""
    return pc.sum(pc.binary_length(texts)).as_py() or 0


def _load_encoder(path: Path):
    from data_prep.sp_encode import Encoder

    return Encoder(path)


def _publish(tmp_dir: Path, final_dir: Path) -> None:
    """Atomic: the unit is visible complete or not at all. Another task may have finished the
    same unit meanwhile (both outputs are identical); then ours is dropped."""
    try:
        tmp_dir.rename(final_dir)
    except OSError:
        if not final_dir.is_dir():
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)


# Built once per run, before the worker processes are forked (the normaliser, filters and
# tokenizer are not free to set up).
_PROCESSOR: UnitProcessor | None = None


def init_worker(data: DataConfig, spiece_path: Path | None = None) -> None:
    global _PROCESSOR
    _PROCESSOR = UnitProcessor(data, spiece_path)
    _import_what_the_probe_imports()


def init_child_process() -> None:
    _probe_pandas_without_importing()


class _RefusePandas(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "pandas":
            raise ImportError("pandas is not used by data-prep workers")
        return None


def _import_what_the_probe_imports() -> None:
    """Before the fork: pyarrow's first conversion from Python objects (the probe below) also
    imports dateutil.relativedelta, ~8 ms in each forked worker while a core waits; 0.6 ms once
    the parent has it."""
    with contextlib.suppress(ImportError):
        import dateutil.relativedelta  # noqa: F401


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
