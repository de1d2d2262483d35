"""Streaming corpus readers: yield raw documents and rejected records, never load a file whole.

`text` is the CC-100 / OSCAR-2019 layout: one paragraph per line, a blank line ends a document.
`jsonl` is one JSON object per line (wikiextractor --json, OSCAR 22.01+ with text_field=content).
Files ending in .gz, .xz or .bz2 are decompressed on the fly.
"""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

_OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}


@dataclass
class RawDoc:
    """A document as read, before cleaning."""

    text: str
    where: str  # "file:line" of the document's first line
    doc_id: str | None = None
    title: str = ""
    url: str = ""
    num_bad_byte_lines: int = 0  # lines that had invalid UTF-8, decoded with U+FFFD


@dataclass
class Reject:
    """A record that could not be read as a document."""

    where: str  # "file:line"
    reason: str


def open_binary(path: Path) -> BinaryIO:
    return _OPENERS.get(path.suffix, open)(path, "rb")


def decode_line(raw: bytes) -> tuple[str, bool]:
    """(text without the line ending, whether it had invalid UTF-8 bytes)."""
    try:
        text, bad = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, bad = raw.decode("utf-8", errors="replace"), True
    return text.rstrip("\r\n"), bad


def read_text(path: Path) -> Iterator[RawDoc]:
    """Documents of a blank-line-separated text file; runs of blank lines are one separator."""
    lines: list[str] = []
    first_line, num_bad = 0, 0
    with open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            text, bad = decode_line(raw)
            if not text.strip():
                if lines:
                    yield RawDoc("\n".join(lines), f"{path}:{first_line}", num_bad_byte_lines=num_bad)
                lines, num_bad = [], 0
                continue
            if not lines:
                first_line = line_no
            lines.append(text)
            num_bad += bad
    if lines:
        yield RawDoc("\n".join(lines), f"{path}:{first_line}", num_bad_byte_lines=num_bad)


def read_jsonl(path: Path, text_field: str) -> Iterator[RawDoc | Reject]:
    """One document per JSON line; malformed lines come back as `Reject`, never raise."""
    with open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            text, bad = decode_line(raw)
            if text.strip():
                yield parse_json_record(text, f"{path}:{line_no}", text_field, bad)


def parse_json_record(line: str, where: str, text_field: str, bad: bool) -> RawDoc | Reject:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return Reject(where, f"malformed JSON: {e}")
    if not isinstance(record, dict):
        return Reject(where, f"not a JSON object: {type(record).__name__}")
    text = record.get(text_field)
    if not isinstance(text, str):
        return Reject(where, f"field {text_field!r} missing or not a string")
    doc_id = record.get("id")
    return RawDoc(
        text,
        where,
        doc_id=None if doc_id is None else str(doc_id),
        title=str(record.get("title") or ""),
        url=str(record.get("url") or ""),
        num_bad_byte_lines=int(bad),
    )


def read_file(path: Path, fmt: str, text_field: str) -> Iterator[RawDoc | Reject]:
    if fmt == "text":
        return read_text(path)
    return read_jsonl(path, text_field)
