"""Tokenize documents and pack them into fixed-length windows of token ids.

Every document is followed by EOS (id 1); documents are concatenated in shard order and
cut into windows of exactly `pack_length` tokens. The last partial window is dropped and
its length recorded as `dropped_tail_tokens`.

Output: `tokens/shard-NNNNN.arrow`, Arrow IPC stream, one column
`input_ids: fixed_size_list<int32>[pack_length]`. A reader needs only pyarrow and numpy::

    table = pa.ipc.open_stream(pa.memory_map(path)).read_all()
    ids = table.column("input_ids").combine_chunks().values.to_numpy().reshape(-1, pack_length)

Speed: texts go to SentencePiece in chunks of about `ENCODE_CHUNK_BYTES`, encoded by its
C++ thread pool with the GIL released, returned as int32 buffers (no Python ints), and
packed with numpy. Memory is bounded by a few chunks, whatever the corpus size; the output
depends only on the documents, never on the number of threads.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from data_prep.shards import ShardWriter, write_json
from data_prep.sp_encode import Encoder
from data_prep.tokenizer import EOS_ID, iter_doc_batches

# UTF-8 text per encode call: large enough to keep every core busy and the per-call cost
# negligible, small enough that texts + ids (~0.8 bytes of int32 per text byte for
# Japanese) stay a few tens of MB.
ENCODE_CHUNK_BYTES = 8 * 2**20
# A pre-encoded unit's tokens.bin and lengths.bin (written by worker.TokenSink, read here).
UNIT_IDS_DTYPE = np.dtype(np.int32)
EOS = np.array([EOS_ID], dtype=UNIT_IDS_DTYPE)


def build_tokens_schema(pack_length: int) -> pa.Schema:
    return pa.schema([("input_ids", pa.list_(pa.int32(), pack_length))])


def iter_text_chunks(docs_dir: Path, chunk_bytes: int) -> Iterator[list[bytes]]:
    """UTF-8 texts of every document in shard order, in lists of about `chunk_bytes`.

    A list closes at the first document that brings it to `chunk_bytes`.
    """
    chunk: list[bytes] = []
    num_bytes = 0
    for batch in iter_doc_batches(docs_dir, ["text"]):
        for text in iter_utf8(batch.column("text")):
            chunk.append(text)
            num_bytes += len(text)
            if num_bytes >= chunk_bytes:
                yield chunk
                chunk, num_bytes = [], 0
    if chunk:
        yield chunk


def iter_utf8(texts: pa.Array) -> Iterator[bytes]:
    """The UTF-8 bytes of each string, sliced from the Arrow buffers.

    SentencePiece takes UTF-8 directly, so this skips a decode to str and re-encode per
    document; and unlike `to_pylist()` it does not import pandas (~0.5 s per process).
    """
    large = pa.types.is_large_string(texts.type) or pa.types.is_large_binary(texts.type)
    dtype = np.dtype(np.int64 if large else np.int32)
    _, offsets_buffer, data_buffer = texts.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=dtype, count=len(texts) + 1, offset=texts.offset * dtype.itemsize)
    data = memoryview(data_buffer if data_buffer is not None else b"")
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        yield data[start:end].tobytes()


def encode_with_eos(encoder: Encoder, texts: list[bytes], num_threads: int) -> np.ndarray:
    """Ids of `texts` concatenated, each document followed by EOS."""
    return join_with_eos(encoder.encode(texts, num_threads=num_threads))


def join_with_eos(encoded: list[np.ndarray]) -> np.ndarray:
    """Documents' ids concatenated, each followed by EOS (UNIT_IDS_DTYPE)."""
    pieces = [EOS] * (2 * len(encoded))
    pieces[::2] = encoded
    return np.concatenate(pieces).astype(UNIT_IDS_DTYPE, copy=False) if pieces else np.zeros(0, UNIT_IDS_DTYPE)


def to_windows_batch(tokens: np.ndarray, pack_length: int) -> pa.RecordBatch:
    # Zero-copy view of the ids; pa.array() would import pandas (~0.5 s per process).
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    values = pa.Array.from_buffers(pa.int32(), len(tokens), [None, pa.py_buffer(tokens)])
    column = pa.FixedSizeListArray.from_arrays(values, pack_length)
    return pa.RecordBatch.from_arrays([column], schema=build_tokens_schema(pack_length))


class WindowPacker:
    """Cuts a stream of token ids into full windows, carrying the remainder to the next call."""

    def __init__(self, writer: ShardWriter, pack_length: int):
        self.writer, self.pack_length = writer, pack_length
        self.carry = np.zeros(0, dtype=np.int32)
        self.num_sequences = 0

    def add(self, tokens: np.ndarray) -> None:
        tokens = np.concatenate([self.carry, tokens]) if len(self.carry) else tokens
        num_full = len(tokens) // self.pack_length
        if num_full:
            self.writer.write(to_windows_batch(tokens[: num_full * self.pack_length], self.pack_length))
            self.num_sequences += num_full
        # A copy, so the chunk's buffer can be freed.
        self.carry = tokens[num_full * self.pack_length :].copy()


def load_unit_keep(keep_path: Path, unit_dirs: list[Path]) -> list[np.ndarray]:
    """The merge's keep mask (layout.keep_file), cut per unit by its number of encoded documents."""
    counts = [(unit_dir / "lengths.bin").stat().st_size // UNIT_IDS_DTYPE.itemsize for unit_dir in unit_dirs]
    keep = np.load(keep_path)
    if len(keep) != sum(counts):
        raise ValueError(f"{keep_path}: {len(keep)} documents in the keep mask but {sum(counts)} encoded in the units")
    return np.split(keep, np.cumsum(counts)[:-1])


def iter_unit_token_chunks(unit_dir: Path, keep: np.ndarray,
                           chunk_tokens: int = ENCODE_CHUNK_BYTES // 4) -> Iterator[np.ndarray]:
    """Ids (with EOS) of a pre-encoded unit's kept documents, in order, about `chunk_tokens` at a time.

    The unit's files hold every document that passed its filters; `keep` (the merge's mask of
    the unit) drops the duplicates. Read through a memory map in chunks: bounded memory per unit.
    """
    lengths = np.fromfile(unit_dir / "lengths.bin", dtype=UNIT_IDS_DTYPE)
    if len(keep) != len(lengths):
        raise ValueError(f"{unit_dir}: {len(lengths)} encoded documents but {len(keep)} in the keep mask")
    if not len(lengths):
        return
    tokens = np.memmap(unit_dir / "tokens.bin", dtype=UNIT_IDS_DTYPE, mode="r")
    ends = np.cumsum(lengths, dtype=np.int64)
    first = 0
    while first < len(lengths):
        last = int(np.searchsorted(ends, ends[first] - lengths[first] + chunk_tokens, side="right"))
        last = max(last, first + 1)
        begin = int(ends[first] - lengths[first])
        chunk = np.asarray(tokens[begin:int(ends[last - 1])])
        if keep[first:last].all():
            yield chunk
        else:
            yield chunk[np.repeat(keep[first:last], lengths[first:last])]
        first = last


def pack_unit_windows(unit_dirs: list[Path], keep: list[np.ndarray], pack_length: int, out_dir: Path,
                      shard_bytes: int) -> dict:
    """The windows of units the docs workers already encoded (the same windows as `pack_tokens`),
    into `out_dir`; returns the counts and shards of the manifest."""
    chunks = (chunk for unit_dir, unit_keep in zip(unit_dirs, keep) for chunk in iter_unit_token_chunks(unit_dir, unit_keep))
    return pack_windows(chunks, pack_length, out_dir, shard_bytes)


def pack_windows(chunks: Iterator[np.ndarray], pack_length: int, out_dir: Path, shard_bytes: int) -> dict:
    """Ids (EOS after each document), chunk by chunk, into windows of `pack_length` in shards of
    `out_dir`; returns the counts and shards of the manifest."""
    writer = ShardWriter(out_dir, build_tokens_schema(pack_length), shard_bytes)
    packer = WindowPacker(writer, pack_length)
    for chunk in chunks:
        packer.add(chunk)
    return get_pack_counts(packer, writer, pack_length)


def pack_unit_tokens(unit_dirs: list[Path], keep: list[np.ndarray], pack_length: int, out_dir: Path, shard_bytes: int,
                     vocab_size: int) -> dict:
    """Like `pack_tokens`, from units the docs workers already encoded: the same windows."""
    counts = pack_unit_windows(unit_dirs, keep, pack_length, out_dir, shard_bytes)
    return write_tokens_manifest(counts, vocab_size, out_dir)


# Units packed ahead of the tokens stage, while the docs merge writes its shards (pipeline.py):
# `packed/` in the docs work directory, with what it was packed with in PREPACKED_FILE.
PREPACKED_DIR = "packed"
PREPACKED_FILE = "packed.json"


def prepack_units(unit_dirs: list[Path], keep: list[np.ndarray], pack_length: int, shard_bytes: int,
                  out_dir: Path) -> None:
    """`pack_unit_windows` into `out_dir`, for the tokens stage to adopt (`adopt_prepacked`).
    Built in a .tmp directory and renamed when complete: a killed run leaves nothing to adopt."""
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    for stale in (tmp_dir, out_dir):
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    counts = pack_unit_windows(unit_dirs, keep, pack_length, tmp_dir, shard_bytes)
    write_json(tmp_dir / PREPACKED_FILE, {**counts, "shard_bytes": shard_bytes})
    tmp_dir.rename(out_dir)


def adopt_prepacked(packed_dir: Path, pack_length: int, shard_bytes: int, vocab_size: int, out_dir: Path) -> dict | None:
    """Move prepacked shards into the tokens stage's `out_dir` and return its manifest; None if
    there are none, or they were packed with another window length or shard size."""
    info_file = packed_dir / PREPACKED_FILE
    if not info_file.is_file():
        return None
    counts = json.loads(info_file.read_text(encoding="utf-8"))
    if (counts.pop("pack_length"), counts.pop("shard_bytes")) != (pack_length, shard_bytes):
        return None
    for shard in counts["shards"]:
        (packed_dir / shard["file"]).rename(out_dir / shard["file"])
    return write_tokens_manifest({"pack_length": pack_length, **counts}, vocab_size, out_dir)


def get_pack_counts(packer: "WindowPacker", writer: ShardWriter, pack_length: int) -> dict:
    return {
        "pack_length": pack_length,
        "num_sequences": packer.num_sequences,
        "num_tokens": packer.num_sequences * pack_length,
        "dropped_tail_tokens": int(len(packer.carry)),
        "shards": writer.close(),
    }


def write_tokens_manifest(counts: dict, vocab_size: int, out_dir: Path) -> dict:
    """tokens/manifest.json: the pack counts, the ids the trainer needs, the shards."""
    manifest = {key: counts[key] for key in ("pack_length", "num_sequences", "num_tokens", "dropped_tail_tokens")}
    manifest.update(eos_id=EOS_ID, vocab_size=vocab_size, shards=counts["shards"])
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def pack_tokens(
    docs_dir: Path, spiece_path: Path, pack_length: int, out_dir: Path, shard_bytes: int, vocab_size: int,
    num_threads: int | None = None,
) -> dict:
    """Write packed token shards into `out_dir` and return the manifest (also written).

    `vocab_size` is recorded for the trainer: ids the model must embed (pieces + sentinels).
    `num_threads`: SentencePiece encoding threads (default: one per CPU); the output is the same for any value.
    """
    encoder = Encoder(spiece_path)
    num_threads = num_threads or os.cpu_count() or 1
    chunks = (encode_with_eos(encoder, texts, num_threads) for texts in iter_text_chunks(docs_dir, ENCODE_CHUNK_BYTES))
    return write_tokens_manifest(pack_windows(chunks, pack_length, out_dir, shard_bytes), vocab_size, out_dir)
