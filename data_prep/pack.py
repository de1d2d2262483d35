"""Tokenize documents and pack them into fixed-length windows of token ids.

Every document is followed by EOS (id 1); documents are concatenated in shard order and
cut into windows of exactly `pack_length` tokens. The last partial window is dropped and
its length recorded as `dropped_tail_tokens`.

Output: `tokens/shard-NNNNN.arrow`, Arrow IPC stream, one column
`input_ids: fixed_size_list<int32>[pack_length]`. A reader needs only pyarrow and numpy::

    table = pa.ipc.open_stream(pa.memory_map(path)).read_all()
    ids = table.column("input_ids").combine_chunks().values.to_numpy().reshape(-1, pack_length)
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import sentencepiece as spm

from data_prep.shards import ShardWriter, iter_batches, list_shards, write_json
from data_prep.tokenizer import EOS_ID


def build_tokens_schema(pack_length: int) -> pa.Schema:
    return pa.schema([("input_ids", pa.list_(pa.int32(), pack_length))])


def iter_doc_tokens(docs_dir: Path, sp: spm.SentencePieceProcessor) -> Iterator[np.ndarray]:
    """One int32 array per doc-shard record batch: its documents' ids, each followed by EOS."""
    for shard in list_shards(docs_dir):
        for batch in iter_batches(shard):
            encoded = sp.encode(batch.column("text").to_pylist(), num_threads=os.cpu_count())
            for ids in encoded:
                ids.append(EOS_ID)
            num_tokens = sum(len(ids) for ids in encoded)
            yield np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=num_tokens)


def to_windows_batch(tokens: np.ndarray, pack_length: int) -> pa.RecordBatch:
    values = pa.array(tokens, type=pa.int32())
    column = pa.FixedSizeListArray.from_arrays(values, pack_length)
    return pa.RecordBatch.from_arrays([column], schema=build_tokens_schema(pack_length))


def pack_tokens(
    docs_dir: Path, spiece_path: Path, pack_length: int, out_dir: Path, shard_bytes: int, vocab_size: int
) -> dict:
    """Write packed token shards into `out_dir` and return the manifest (also written).

    `vocab_size` is recorded for the trainer: ids the model must embed (pieces + sentinels).
    """
    sp = spm.SentencePieceProcessor(model_file=str(spiece_path))
    writer = ShardWriter(out_dir, build_tokens_schema(pack_length), shard_bytes)
    tail = np.zeros(0, dtype=np.int32)
    num_sequences = 0
    for tokens in iter_doc_tokens(docs_dir, sp):
        tail = np.concatenate([tail, tokens])
        num_full = len(tail) // pack_length
        if num_full:
            writer.write(to_windows_batch(tail[: num_full * pack_length], pack_length))
            tail = tail[num_full * pack_length :]
            num_sequences += num_full
    manifest = {
        "pack_length": pack_length,
        "num_sequences": num_sequences,
        "num_tokens": num_sequences * pack_length,
        "dropped_tail_tokens": int(len(tail)),
        "eos_id": EOS_ID,
        "vocab_size": vocab_size,
        "shards": writer.close(),
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest
