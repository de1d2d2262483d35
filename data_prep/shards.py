"""Arrow IPC *stream* shard writer that rolls to a new file at a target size.

Stream format (not the random-access file format) because `datasets.Dataset.from_file`
reads it, and `pa.ipc.open_stream(pa.memory_map(path)).read_all()` maps it without copying.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa


def get_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


class HashingFile:
    """A binary file being written and the sha256 of what was written: a shard's digest without
    reading it back."""

    def __init__(self, f):
        self.f, self.digest = f, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()

    @property
    def closed(self) -> bool:
        return self.f.closed

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


class ShardWriter:
    """Writes record batches to `shard-00000.arrow`, `shard-00001.arrow`, ... in `out_dir`.

    A batch is split so that a shard ends just past `shard_bytes`; a shard always holds at
    least one row, so one huge row makes a shard of its own.
    """

    def __init__(self, out_dir: Path, schema: pa.Schema, shard_bytes: int):
        self.out_dir, self.schema, self.shard_bytes = out_dir, schema, shard_bytes
        self.shards: list[dict[str, Any]] = []
        self._sink: pa.OSFile | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._rows = 0
        self._origins: set = set()

    def write(self, batch: pa.RecordBatch, origin: Any = None) -> None:
        """Append rows; `origin` (e.g. an input index) is listed in the manifest of every shard the rows land in."""
        start = 0
        row_bytes = max(batch.nbytes / max(batch.num_rows, 1), 1.0)
        while start < batch.num_rows:
            if self._writer is None:
                self._open()
            rows_left = batch.num_rows - start
            rows_to_fill = math.ceil((self.shard_bytes - self._sink.tell()) / row_bytes)
            # Near the end of a shard, write half the estimate and look again, so a shard
            # overshoots its target by about one row even when row sizes vary a lot.
            take = rows_left if rows_left < rows_to_fill else max(1, rows_to_fill // 2)
            self._writer.write_batch(batch.slice(start, take))
            self._rows += take
            if origin is not None:
                self._origins.add(origin)
            start += take
            if self._sink.tell() >= self.shard_bytes:
                self._close()

    def close(self) -> list[dict[str, Any]]:
        """Finish the open shard; returns one {file, rows, bytes, sha256} entry per shard."""
        if self._writer is not None:
            self._close()
        return self.shards

    def _open(self) -> None:
        path = self.out_dir / f"shard-{len(self.shards):05d}.arrow"
        self._hashing = HashingFile(open(path, "wb"))
        self._sink = pa.PythonFile(self._hashing, mode="w")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._rows = 0
        self._origins = set()

    def _close(self) -> None:
        self._writer.close()
        self._sink.close()
        path = self.out_dir / f"shard-{len(self.shards):05d}.arrow"
        entry = {"file": path.name, "rows": self._rows, "bytes": path.stat().st_size, "sha256": self._hashing.hexdigest()}
        if self._origins:
            entry["inputs"] = sorted(self._origins)
        self.shards.append(entry)
        self._writer = self._sink = None


def list_shards(stage_dir: Path) -> list[Path]:
    return sorted(stage_dir.glob("shard-*.arrow"))
