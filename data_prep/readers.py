"""Streaming corpus readers: yield raw documents and rejected records, never load a file whole.

Formats (`detect_format` guesses one from the name and the first record):

- `text`, `oscar2019`, `cc100`: one paragraph per line; a blank (whitespace-only) line ends a document,
  and runs of blank lines are one separator.
- `jsonl`: one JSON object per line, text under `text_field` (from a plain file, runs of lines come
  as a `DocBatch` from `read_split_batches`: see data_prep/json_blocks.py); `wikiextractor`: `wikiextractor --json`
  lines (entities such as `&lt;` decoded); `oscar`: OSCAR 22.01+ lines (`content`, `warc_headers`,
  `metadata`, the latter summarised in `RawDoc.meta`).
- `wikipedia_xml`: a MediaWiki export dump, page by page; only articles are kept (`is_article`:
  namespace 0 and not a redirect), other pages are skipped silently: they are not errors. Wikitext
  becomes plain text through `data_prep.wikitext`.

Files ending in .gz, .xz, .bz2 or .zst are decompressed on the fly.

Splits: `plan_splits` cuts a file into byte ranges [start, end) that `read_split` reads
independently; the records of one file are partitioned by its splits. A record belongs to the split
that holds its first byte: for line formats the first byte of its first line, for dump pages the
`<` of `<page>` (in bz2 multistream dumps: the stream holding it).

`where` says where a record came from:
- "file:line" (1-based) for line records when the split starts at byte 0, compressed or not;
- "file@byte=N" when it starts later (N: offset of the record's first line in the file);
- "file:page=ID" for dump pages, and, when a malformed page has no readable id, "file@byte=N"
  (offset of `<page>` in the decompressed stream) or, in a bz2 split that starts later,
  "file@stream=S:byte=N" (S: file offset of the bz2 stream, N: offset in its decompressed bytes);
- "file@byte=N" for a truncated or corrupt compressed stream: N counts the decompressed bytes
  (from the split's start) that were read intact.

Bad input never raises: invalid UTF-8 is decoded with U+FFFD and counted in `num_bad_byte_lines`
(so is a JSON lone surrogate escape);
malformed records, lines over `max_line_bytes` (skipped without being held in memory; in the
paragraph formats such a line also ends the document it was in) and a truncated or corrupt
compressed stream each come back as a `Reject`. At a corrupt stream the file stops, and the record
it cut short is dropped, not yielded. Only a missing file raises (FileNotFoundError).
"""
from __future__ import annotations

import bz2
import errno
import gzip
import html
import io
import json
import lzma
import mmap
import re
import zlib
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Generator, Iterator
from urllib.parse import quote
from xml.etree import ElementTree

import orjson
import zstandard

from data_prep.json_blocks import (BLOCK_BYTES, UTF8_BOM, BlockParser, DocBatch, bom_length, can_read_blocks,
                                  find_line_starts, find_object_lines)
from data_prep.wikitext import wikitext_to_text

FORMATS = ("text", "jsonl", "wikipedia_xml", "wikiextractor", "oscar2019", "oscar", "cc100")
PARAGRAPH_FORMATS = frozenset({"text", "oscar2019", "cc100"})
COMPRESSED_SUFFIXES = frozenset({".gz", ".xz", ".bz2", ".zst", ".zstd"})
# What a decompressor (or the disk) raises while streaming: truncated files, bad checksums, garbage.
STREAM_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error, zstandard.ZstdError)
DEFAULT_MAX_LINE_BYTES = 16 * 2**20

_SCAN_BYTES = 64 * 2**10  # chunk size for skipping over-long lines and scanning backwards
# Compressed bytes handed to a bz2/zstd decoder per call. A call's whole output is held at once
# (zstandard's decompressobj takes no output bound), so this bounds memory: a zstd call yields at
# most ~32k x its input (an all-RLE frame: 4 bytes per 128 KiB block), i.e. 16 MiB here, and
# ~2 KiB on real text; a bz2 call at most one block (900 kB before its run-length stage).
_DECODER_INPUT_BYTES = 512
_PEEK_BYTES = 2**20  # detect_format reads at most this much of a first line
# Start of a bz2 stream: "BZh", block size digit, then the first block's magic (pi in BCD).
_BZ2_STREAM_START = re.compile(rb"BZh[1-9]\x31\x41\x59\x26\x53\x59")
_OSCAR2019_NAME = re.compile(r"[a-z]{2,3}(_dedup)?\.txt\.gz|.*oscar.*")
_PAGE_END = b"</page>"
_PAGE_ID = re.compile(rb"<id>\s*(\d+)\s*</id>")


@dataclass
class RawDoc:
    """A document as read, before cleaning."""

    text: str
    where: str  # see the module docstring
    doc_id: str | None = None
    title: str = ""
    url: str = ""
    num_bad_byte_lines: int = 0  # lines that had invalid UTF-8, decoded with U+FFFD
    # OSCAR 22.01+: quality_warnings, categories (lists), harmful_pp, lang_score (float or None).
    meta: dict = field(default_factory=dict)


@dataclass
class Reject:
    """A record that could not be read as a document."""

    where: str  # see the module docstring
    reason: str


def is_article(ns: str | int | None, redirect: bool) -> bool:
    """Whether a dump page is an encyclopedia article: main namespace (0) and not a redirect."""
    return str(ns).strip() == "0" and not redirect


# --- public entry points ----------------------------------------------------------------


def detect_format(path: Path) -> str:
    """One of FORMATS, from the file name, else from the first records of the decompressed stream.

    Raises FileNotFoundError for a missing file, ValueError if it cannot be decompressed at all.
    """
    path = Path(path)
    _require_file(path)
    name = path.name.lower()
    if name.endswith((".xml", ".xml.bz2")):
        return "wikipedia_xml"
    if name == "ja.txt.xz" or "cc100" in name:
        return "cc100"
    return _format_from_head(peek_lines(path), name)


TAPER_PARTS = 4


def plan_splits(path: Path, fmt: str, unit_bytes: int) -> list[tuple[int, int | None]]:
    """Byte ranges [start, end) of the file (end None: to its end) that read_split reads independently.

    Uncompressed files are cut every `unit_bytes` without scanning (the reader re-aligns to records),
    their last `unit_bytes` in TAPER_PARTS;
    bz2 Wikipedia dumps at bz2 stream starts (multistream dumps have one every 100 pages); other
    compressed files cannot be cut and are one split.
    """
    path = Path(path)
    size = path.stat().st_size
    fmt = detect_format(path) if fmt == "auto" else fmt
    if path.suffix == ".bz2" and fmt == "wikipedia_xml":
        return group_streams(find_bz2_stream_starts(path), unit_bytes)
    if path.suffix in COMPRESSED_SUFFIXES or size <= unit_bytes:
        return [(0, None)]
    # The file's last `unit_bytes` go in TAPER_PARTS smaller splits: the work ends on small
    # units, so the workers finish close together instead of all but one waiting on a full unit.
    tail = size - unit_bytes
    starts = [*range(0, tail, unit_bytes), *range(tail, size, -(-unit_bytes // TAPER_PARTS))]
    return list(zip(starts, [*starts[1:], None]))


def read_split(
    path: Path,
    fmt: str,
    start: int = 0,
    end: int | None = None,
    *,
    text_field: str = "text",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[RawDoc | Reject]:
    """The documents and rejects of every record whose first byte lies in [start, end), in file order.

    `fmt` is one of FORMATS or "auto". Splits come from plan_splits: a split starting past byte 0 is
    only possible in an uncompressed file or, at a bz2 stream start, in a bz2 Wikipedia dump.
    Raises FileNotFoundError (missing file) and ValueError (bad format or split) before reading;
    everything found while reading comes back as a Reject.

    `where` of each item: "file:LINE" (1-based) for line records of a split starting at byte 0;
    "file@byte=N" for those of a later split (N: file offset of the record's first line);
    "file:page=ID" for dump pages (also malformed ones, if their id can be read, else
    "file@byte=N", N the offset of `<page>` in the decompressed stream, or in a bz2 split
    starting later "file@stream=S:byte=N", S the file offset of its bz2 stream); and
    "file@byte=N" for a truncated or corrupt compressed stream, N counting the decompressed bytes
    read intact from the split's start.
    """
    path = Path(path)
    items = read_split_batches(path, fmt, start, end, text_field=text_field, max_line_bytes=max_line_bytes)
    return _expand_batches(Split(path, start, end, io.BytesIO(), 0), items)


def _expand_batches(split: Split, items: Iterator[RawDoc | Reject | DocBatch]) -> Iterator[RawDoc | Reject]:
    """`split`: only its `where_line` is used."""
    for item in items:
        if isinstance(item, DocBatch):
            yield from expand_batch(split, item)
        else:
            yield item


def read_split_batches(
    path: Path,
    fmt: str,
    start: int = 0,
    end: int | None = None,
    *,
    text_field: str = "text",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[RawDoc | Reject | DocBatch]:
    """`read_split`, with runs of plain-file generic JSON lines as a `DocBatch` each (what the
    docs workers read: no Python object per document); `read_split` is this, expanded."""
    path = Path(path)
    _require_file(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"{path}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if start > 0 and path.suffix in COMPRESSED_SUFFIXES and not _splittable_bz2(path, fmt):
        raise ValueError(f"{path}: a {path.suffix} file cannot be read from byte {start}")
    return _read_split(path, fmt, start, end, text_field, max_line_bytes)


def read_file(
    path: Path, fmt: str, text_field: str = "text", max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[RawDoc | Reject]:
    """The whole file as one split."""
    return read_split(path, fmt, text_field=text_field, max_line_bytes=max_line_bytes)


def read_text(path: Path) -> Iterator[RawDoc | Reject]:
    return read_split(path, "text")


def read_jsonl(path: Path, text_field: str) -> Iterator[RawDoc | Reject]:
    return read_split(path, "jsonl", text_field=text_field)


def _read_split(path, fmt, start, end, text_field, max_line_bytes) -> Iterator[RawDoc | Reject]:
    split = open_split(path, fmt, start, end, max_line_bytes)
    with split.stream:
        lines = LineStream(split.stream, split.offset, max_line_bytes)
        if fmt in PARAGRAPH_FORMATS:
            yield from paragraph_docs(split, lines)
        elif fmt == "wikipedia_xml":
            yield from wiki_docs(split, lines, max_line_bytes)
        else:
            blocks = BlockParser(text_field) if _reads_blocks(split, fmt, text_field) else None
            yield from json_docs(split, lines, build_json_parser(fmt, text_field), blocks)


def _reads_blocks(split: Split, fmt: str, text_field: str) -> bool:
    """The block reader (data_prep/json_blocks.py) takes generic JSON lines from plain files (a compressed stream's bytes
    could not be read again line by line after a failed block)."""
    return fmt == "jsonl" and split.streams is None and not split.compressed and can_read_blocks(text_field)


def _require_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "corpus file not found", str(path))


def _splittable_bz2(path: Path, fmt: str) -> bool:
    # Dump streams hold whole pages; in line formats a stream may end mid-record, so only
    # Wikipedia dumps are cut at stream starts.
    return path.suffix == ".bz2" and fmt == "wikipedia_xml"


# --- format detection -------------------------------------------------------------------


def peek_lines(path: Path, max_lines: int = 5) -> list[bytes]:
    """Up to `max_lines` non-blank lines from the start of the decompressed stream (each cut at 1 MiB)."""
    lines: list[bytes] = []
    try:
        with open_binary(path) as f:
            while len(lines) < max_lines and (raw := f.readline(_PEEK_BYTES)):
                if raw.strip():
                    lines.append(raw.removeprefix(UTF8_BOM).strip())
    except STREAM_ERRORS as e:
        if not lines:  # a stream corrupt later on is the reader's to report, record by record
            raise ValueError(f"{path}: cannot open or decompress: {e}") from e
    return lines


def _format_from_head(lines: list[bytes], name: str) -> str:
    if any(line.startswith(b"<mediawiki") for line in lines):
        return "wikipedia_xml"
    if lines and lines[0].startswith(b"{"):
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                return _json_format(record)
        return "jsonl"
    # Read the same way: the name only labels the source. OSCAR 2019 ships "ja.txt.gz", "ja_dedup.txt.gz".
    return "oscar2019" if _OSCAR2019_NAME.fullmatch(name) else "text"


def _json_format(record: dict) -> str:
    if "content" in record and ("metadata" in record or "warc_headers" in record):
        return "oscar"
    if {"id", "url", "title", "text"} <= record.keys():
        return "wikiextractor"
    return "jsonl"


# --- splits -----------------------------------------------------------------------------


def find_bz2_stream_starts(path: Path) -> list[int]:
    """File offsets of the bz2 streams of a (multistream) file, found by their 10-byte header.

    The pattern could in theory also occur by chance inside compressed data (about 2^-77 per
    byte); a split starting there would report a corrupt stream, and lose nothing.
    """
    if path.stat().st_size == 0:
        return []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return [m.start() for m in _BZ2_STREAM_START.finditer(data)]


def group_streams(starts: list[int], unit_bytes: int) -> list[tuple[int, int | None]]:
    """Splits of consecutive streams, each cut at the first stream start `unit_bytes` or more past its own."""
    if len(starts) < 2 or starts[0] != 0:
        return [(0, None)]  # single stream, or not bz2 at all: the reader will say so
    cuts = [0]
    for stream_start in starts[1:]:
        if stream_start - cuts[-1] >= unit_bytes:
            cuts.append(stream_start)
    return list(zip(cuts, [*cuts[1:], None]))


@dataclass
class Split:
    """An open split: the decompressed stream, where reading begins, and which records it owns."""

    path: Path
    start: int
    end: int | None
    stream: BinaryIO
    offset: int  # stream offset where reading begins
    streams: ConcatenatedStreams | None = None  # set for a bz2 dump cut at stream starts
    compressed: bool = False
    first_line_partial: bool = False  # reading begins mid-line: that line is the previous split's

    def file_pos(self, offset: int) -> int:
        """The file offset that decides which split owns the record at stream `offset`."""
        if self.streams is not None:
            return self.streams.stream_start_of(offset)
        return 0 if self.compressed else offset

    def past_end(self, offset: int) -> bool:
        return self.end is not None and self.file_pos(offset) >= self.end

    def owns(self, offset: int) -> bool:
        return self.file_pos(offset) >= self.start and not self.past_end(offset)

    def where_line(self, line: Line) -> str:
        return f"{self.path}:{line.number}" if self.start == 0 else f"{self.path}@byte={line.offset}"

    def where_byte(self, offset: int) -> str:
        if self.streams is not None and self.start > 0:
            stream_start, stream_offset = self.streams.locate(offset)
            return f"{self.path}@stream={stream_start}:byte={stream_offset}"
        return f"{self.path}@byte={offset}"


def open_split(path: Path, fmt: str, start: int, end: int | None, max_line_bytes: int) -> Split:
    if _splittable_bz2(path, fmt):
        streams = ConcatenatedStreams(open(path, "rb"), start, bz2.BZ2Decompressor)
        stream = io.BufferedReader(streams, buffer_size=_SCAN_BYTES)
        return Split(path, start, end, stream, 0, streams=streams)
    if path.suffix in COMPRESSED_SUFFIXES:
        return Split(path, start, end, open_binary(path), 0, compressed=True)
    f = open(path, "rb")
    if start == 0:
        return Split(path, start, end, f, 0)
    if fmt != "wikipedia_xml":
        return Split(path, start, end, f, seek_line_before(f, start, end, max_line_bytes))
    f.seek(start - 1)  # pages are found by their "<page>" tag, wherever the reading starts
    partial = f.read(1) != b"\n"
    return Split(path, start, end, f, start, first_line_partial=partial)


def seek_line_before(f: BinaryIO, start: int, end: int | None, max_line_bytes: int) -> int:
    """Position `f` at the start of the line holding byte start-1; return that offset.

    The split's reader needs the line before its first one: in paragraph formats a document starts
    only after a blank line. A line too long to read is skipped instead: it counts as a separator.
    """
    line_start = find_line_start(f, start - 1, max_line_bytes + 1)
    if line_start is not None:
        f.seek(line_start)
        return line_start
    f.seek(start - 1)
    # A split inside one huge line holds no record start: never read past its end for it.
    return start - 1 + discard_rest_of_line(f, None if end is None else end - start + 1)


def find_line_start(f: BinaryIO, pos: int, limit: int) -> int | None:
    """Offset where the line holding byte `pos` starts; None if that is more than `limit` bytes back."""
    hi = pos
    while hi > 0 and pos - hi < limit:
        lo = max(0, hi - _SCAN_BYTES, pos - limit)
        f.seek(lo)
        newline = f.read(hi - lo).rfind(b"\n")
        if newline >= 0:
            return lo + newline + 1
        hi = lo
    return 0 if hi == 0 else None


def discard_rest_of_line(f: BinaryIO, limit: int | None = None) -> int:
    """Read up to and including the next newline in bounded chunks, or `limit` bytes at most;
    return the bytes read."""
    num_bytes = 0
    while limit is None or num_bytes < limit:
        size = _SCAN_BYTES if limit is None else min(_SCAN_BYTES, limit - num_bytes)
        chunk = f.readline(size)
        if not chunk:
            break
        num_bytes += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return num_bytes


# --- decompression ----------------------------------------------------------------------


def open_binary(path: Path) -> BinaryIO:
    """The decompressed bytes of a whole file, by its suffix."""
    if path.suffix == ".gz":
        return io.BufferedReader(ReadOnce(gzip.open(path, "rb")), _SCAN_BYTES)
    if path.suffix == ".xz":
        return io.BufferedReader(ReadOnce(lzma.open(path, "rb")), _SCAN_BYTES)
    if path.suffix in (".bz2", ".zst", ".zstd"):
        new_decoder = bz2.BZ2Decompressor if path.suffix == ".bz2" else zstandard.ZstdDecompressor().decompressobj
        return io.BufferedReader(ConcatenatedStreams(open(path, "rb"), 0, new_decoder), _SCAN_BYTES)
    return open(path, "rb")


class ReadOnce(io.RawIOBase):
    """A GzipFile or LZMAFile read through `read1`, for a fast C BufferedReader to sit on.

    GzipFile.readline costs a Python call per line (a third of the reading time); a plain
    BufferedReader on top would call its `readinto`, which waits for a full buffer, and at a
    corrupt spot would drop all the good bytes decoded towards it. `read1` hands them out at once.
    """

    def __init__(self, f: BinaryIO):
        super().__init__()
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.f.read1(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.f.close()
        super().close()


class ConcatenatedStreams(io.RawIOBase):
    """Decompressed bytes of the bz2 streams or zstd frames of a file, from the stream at `start` on.

    Unlike bz2.open and zstandard's stream_reader, this records where each stream starts (in the
    file and in the output) and raises EOFError for a cut-off last stream: zstandard's reader ends
    silently there, which would pass a truncated record off as a whole one.
    """

    def __init__(self, raw: BinaryIO, start: int, new_decoder: Callable):
        super().__init__()
        self.raw, self.new_decoder, self.decoder = raw, new_decoder, None
        raw.seek(start)
        self.next_raw = start  # file offset of the next compressed byte to decode
        self.unfed = b""  # compressed bytes read past the end of the last stream
        self.pending, self.pending_pos, self.out_pos = memoryview(b""), 0, 0
        self.raw_starts: list[int] = []  # file offset of each stream begun
        self.out_starts: list[int] = []  # output offset where each stream's bytes begin

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self.pending_pos == len(self.pending):
            if not self._decode_more():
                return 0
        num_bytes = min(len(buf), len(self.pending) - self.pending_pos)
        buf[:num_bytes] = self.pending[self.pending_pos : self.pending_pos + num_bytes]
        self.pending_pos += num_bytes
        self.out_pos += num_bytes
        return num_bytes

    def _decode_more(self) -> bool:
        """Decode one more chunk of input into `pending`; False at the clean end of the file."""
        data = self.unfed or self.raw.read(_DECODER_INPUT_BYTES)
        if self.decoder is None:
            if not data:
                return False
            self.raw_starts.append(self.next_raw)
            self.out_starts.append(self.out_pos)
            self.decoder = self.new_decoder()
        elif not data:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
        self.pending, self.pending_pos = memoryview(self.decoder.decompress(data)), 0
        self.unfed, self.next_raw = b"", self.next_raw + len(data)
        if self.decoder.eof:
            self.unfed = self.decoder.unused_data
            self.next_raw -= len(self.unfed)
            self.decoder = None
        return True

    def locate(self, offset: int) -> tuple[int, int]:
        """(file offset of the stream holding output byte `offset`, offset within its output)."""
        i = max(0, bisect_right(self.out_starts, offset) - 1)
        if not self.out_starts:
            return self.next_raw, offset
        return self.raw_starts[i], offset - self.out_starts[i]

    def stream_start_of(self, offset: int) -> int:
        return self.locate(offset)[0]

    def close(self) -> None:
        self.raw.close()
        super().close()


# --- lines ------------------------------------------------------------------------------


@dataclass
class Line:
    offset: int  # offset of the line's first byte in the (decompressed) stream
    number: int  # 1-based, counted from where reading began
    raw: bytes | None  # None: longer than max_line_bytes, skipped without being kept


@dataclass
class Block:
    """Whole lines read at once (LineStream.read_block)."""

    data: bytes
    offset: int  # stream offset of its first line
    number: int  # 1-based number of its first line
    starts: list[int]  # offset of each line in `data`


class LineStream:
    """The lines of a binary stream, read in bounded memory.

    A decompression error ends the iteration quietly and is kept in `error`, with `offset` at the
    end of the last whole line: the caller decides what the cut-off record means.
    """

    def __init__(self, f: BinaryIO, offset: int, max_line_bytes: int):
        self.f, self.offset, self.max_line_bytes = f, offset, max_line_bytes
        self.number = 0
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[Line]:
        return self.iter_lines()

    def iter_lines(self, until: int | None = None, max_lines: int | None = None) -> Iterator[Line]:
        """The lines starting before stream offset `until`, at most `max_lines` of them."""
        try:
            while (until is None or self.offset < until) and max_lines != 0 and (line := self._next_line()):
                max_lines = None if max_lines is None else max_lines - 1
                yield line
        except STREAM_ERRORS as e:
            self.error = e

    def read_block(self, size: int) -> Block | None:
        """The whole lines of about the next `size` bytes (b"" if the next line is longer); None at
        the end. Only for a plain file: a partial last line is left unread by seeking back."""
        data = self.f.read(size)
        if not data:
            return None
        if len(data) == size:
            data = data[: data.rfind(b"\n") + 1]
            self.f.seek(self.offset + len(data))
        block = Block(data, self.offset, self.number + 1, find_line_starts(data))
        self.offset += len(data)
        self.number += len(block.starts)
        return block

    def rewind(self, block: Block) -> None:
        """Back to the start of `block`, to read it line by line."""
        self.f.seek(block.offset)
        self.offset, self.number = block.offset, block.number - 1

    def _next_line(self) -> Line | None:
        raw = self.f.readline(self.max_line_bytes + 1)
        if not raw:
            return None
        num_bytes = len(raw)
        if num_bytes > self.max_line_bytes and not raw.endswith(b"\n"):
            raw, num_bytes = None, num_bytes + discard_rest_of_line(self.f)
        elif self.offset == 0:
            raw = raw.removeprefix(UTF8_BOM)
        self.number += 1
        line = Line(self.offset, self.number, raw)
        self.offset += num_bytes
        return line


def decode_line(raw: bytes) -> tuple[str, bool]:
    """(text without the line ending, whether it had invalid UTF-8 bytes)."""
    try:
        text, bad = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, bad = raw.decode("utf-8", errors="replace"), True
    return text.rstrip("\r\n"), bad


def too_long(where: str, max_line_bytes: int) -> Reject:
    return Reject(where, f"line longer than {max_line_bytes} bytes")


def stream_error(split: Split, lines: LineStream, dropped: str = "") -> Reject:
    reason = f"truncated or corrupt compressed stream: {type(lines.error).__name__}: {lines.error}"
    return Reject(split.where_byte(lines.offset), reason + (f"; dropped {dropped}" if dropped else ""))


# --- paragraph formats: text, oscar2019, cc100 --------------------------------------------


@dataclass
class Paragraphs:
    """The lines of the document being read."""

    first: Line
    owned: bool  # whether it starts inside the split (else it is only read past)
    lines: list[str] = field(default_factory=list)
    num_bad: int = 0

    def build(self, split: Split) -> RawDoc:
        return RawDoc("\n".join(self.lines), split.where_line(self.first), num_bad_byte_lines=self.num_bad)


def paragraph_docs(split: Split, lines: LineStream) -> Iterator[RawDoc | Reject]:
    """Documents separated by blank lines; an over-long line is rejected and also ends its document."""
    doc: Paragraphs | None = None
    for line in lines:
        text, bad = decode_line(line.raw) if line.raw is not None else ("", False)
        if text.strip():
            if doc is None:
                if split.past_end(line.offset):
                    return
                doc = Paragraphs(line, split.owns(line.offset))
            if doc.owned:
                doc.lines.append(text)
                doc.num_bad += bad
            continue
        if doc is not None and doc.owned:
            yield doc.build(split)
        doc = None
        if split.past_end(line.offset):
            return
        if line.raw is None and split.owns(line.offset):
            yield too_long(split.where_line(line), lines.max_line_bytes)
    if lines.error is not None:
        # The document being read may have lost its next lines: it is dropped, not cut short.
        dropped = f"the unfinished document at {split.where_line(doc.first)}" if doc and doc.owned else ""
        yield stream_error(split, lines, dropped)
    elif doc is not None and doc.owned:
        yield doc.build(split)


# --- JSON lines: jsonl, wikiextractor, oscar ----------------------------------------------

JsonParser = Callable[[dict, str, bool], "RawDoc | Reject"]


def json_docs(split: Split, lines: LineStream, parse: JsonParser,
              blocks: BlockParser | None = None) -> Iterator[RawDoc | Reject | DocBatch]:
    """One document per non-blank JSON line; malformed lines come back as `Reject`. With a
    `BlockParser`, runs of good lines come back as a `DocBatch` (see data_prep.json_blocks)."""
    if blocks is None:
        yield from json_line_docs(split, lines, parse)
    else:
        yield from json_block_docs(split, lines, parse, blocks)
    if lines.error is not None:
        # A line cut by the stream's end is never returned by readline: nothing to drop here.
        yield stream_error(split, lines)


def json_line_docs(split: Split, lines: LineStream, parse: JsonParser, until: int | None = None,
                   max_lines: int | None = None) -> Generator[RawDoc | Reject, None, bool]:
    """The per-line reader, over the lines starting before `until` (at most `max_lines`);
    returns whether it reached the split's end."""
    for line in lines.iter_lines(until, max_lines):
        if split.past_end(line.offset):
            return True
        if not split.owns(line.offset):
            continue
        where = split.where_line(line)
        if line.raw is None:
            yield too_long(where, lines.max_line_bytes)
            continue
        record, bad = load_json_line(line.raw, where)
        if record is not None:
            yield record if isinstance(record, Reject) else parse(record, where, bad)
    return False


# How far a block reads past its split's end: far enough for the split's last record, as a
# rule, without reading (and scanning) most of a block of the next split's lines for nothing.
BLOCK_SLACK_BYTES = 256 * 2**10


def get_block_bytes(split: Split, offset: int) -> int:
    """BLOCK_BYTES, or near the split's end what is left of it plus BLOCK_SLACK_BYTES."""
    if split.end is None:
        return BLOCK_BYTES
    return max(1, min(BLOCK_BYTES, split.end - offset + BLOCK_SLACK_BYTES))


def json_block_docs(split: Split, lines: LineStream, parse: JsonParser,
                    blocks: BlockParser) -> Iterator[RawDoc | Reject | DocBatch]:
    """Blocks of lines through json_blocks.BlockParser; a block it cannot vouch for goes line by line."""
    while True:
        try:
            block = lines.read_block(get_block_bytes(split, lines.offset))
        except STREAM_ERRORS as e:
            lines.error = e
            return
        if block is None:
            return
        if not block.data:  # a line longer than a block
            lines.rewind(block)
            if (yield from json_line_docs(split, lines, parse, max_lines=1)):
                return
            continue
        batch, at_end = read_json_block(split, block, blocks, lines.max_line_bytes)
        if batch is None:
            lines.rewind(block)
            yield from json_line_docs(split, lines, parse, until=block.offset + len(block.data))
        else:
            yield batch
        if at_end:
            return


def read_json_block(split: Split, block: Block, blocks: BlockParser, max_line_bytes: int) -> tuple[DocBatch | None, bool]:
    """(the documents of the split's lines in `block`, or None to read them line by line; whether
    the block reaches the split's end). Plain files only: a stream offset is a file offset."""
    starts = block.starts
    lo = bisect_left(starts, split.start - block.offset)
    hi = len(starts) if split.end is None else bisect_left(starts, split.end - block.offset)
    at_end = hi < len(starts)
    rows = find_object_lines(block.data, starts, lo, hi, max_line_bytes, block.offset == 0)
    if not rows:  # None, or no object line of the split (its last lines, blank lines): per line
        return None, at_end
    begin = starts[rows[0]] + (bom_length(block.data, block.offset == 0) if rows[0] == 0 else 0)
    end = starts[rows[-1] + 1] if rows[-1] + 1 < len(starts) else len(block.data)
    batch = blocks.parse(memoryview(block.data)[begin:end],
                         [block.offset + starts[i] for i in rows], [block.number + i for i in rows])
    return batch, at_end


def expand_batch(split: Split, batch: DocBatch) -> list[RawDoc]:
    """A DocBatch as the RawDocs the per-line reader gives."""
    texts, titles, urls = batch.texts.to_pylist(), batch.titles.to_pylist(), batch.urls.to_pylist()
    return [RawDoc(text, split.where_line(Line(offset, number, None)), doc_id=doc_id, title=title, url=url)
            for text, doc_id, title, url, offset, number
            in zip(texts, batch.doc_ids, titles, urls, batch.line_offsets, batch.line_numbers)]


def load_json_line(raw: bytes, where: str) -> tuple[dict | Reject | None, bool]:
    """(the line's JSON object or a Reject, None for a blank line; whether it had invalid UTF-8).

    orjson parses the bytes as they are (UTF-8 checked on the way), about three times as fast as
    a decode plus json.loads: a third of the time a worker spends outside the tokenizer on
    JSON-lines corpora. Every line orjson refuses (blank, invalid UTF-8, NaN, lone surrogates,
    malformed) or may have read differently (a top-level number: orjson turns integers of more
    than 64 bits into floats) goes the json module's way, which has the last word: each line
    gets the same result whichever way it went.
    """
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        record = None
    if isinstance(record, dict) and not any(isinstance(value, float) for value in record.values()):
        return record, False
    text, bad = decode_line(raw)
    record = load_json_object(text, where) if text.strip() else None
    if isinstance(record, dict) and _SURROGATE_ESCAPE.search(text):
        replaced = replace_lone_surrogates(record)
        bad, record = bad or replaced != record, replaced
    return record, bad


# A \uD800-\uDFFF escape: the json module turns one that is not half of a pair into a lone
# surrogate, which no UTF-8 writer (Arrow, files) accepts.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def replace_lone_surrogates(value):
    """`value` with each lone surrogate in its strings (keys too) replaced by U+FFFD, as invalid
    UTF-8 bytes are: the record is kept and counted as having had bad bytes."""
    if isinstance(value, str):
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if isinstance(value, dict):
        return {replace_lone_surrogates(key): replace_lone_surrogates(item) for key, item in value.items()}
    if isinstance(value, list):
        return [replace_lone_surrogates(item) for item in value]
    return value


def build_json_parser(fmt: str, text_field: str) -> JsonParser:
    if fmt == "oscar":
        return oscar_record
    if fmt == "wikiextractor":
        return wikiextractor_record
    return lambda record, where, bad: generic_record(record, where, bad, text_field)


def load_json_object(line: str, where: str) -> dict | Reject:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return Reject(where, f"malformed JSON: {e}")
    if not isinstance(record, dict):
        return Reject(where, f"not a JSON object: {type(record).__name__}")
    return record


def parse_json_record(line: str, where: str, text_field: str, bad: bool) -> RawDoc | Reject:
    """A generic JSON line as a document (kept for callers of the first reader API)."""
    record = load_json_object(line, where)
    return record if isinstance(record, Reject) else generic_record(record, where, bad, text_field)


def generic_record(record: dict, where: str, bad: bool, text_field: str) -> RawDoc | Reject:
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


def wikiextractor_record(record: dict, where: str, bad: bool) -> RawDoc | Reject:
    doc = generic_record(record, where, bad, "text")
    if isinstance(doc, RawDoc):  # wikiextractor leaves HTML entities (&lt;, &amp;) in the text
        doc.text, doc.title = html.unescape(doc.text), html.unescape(doc.title)
    return doc


def oscar_record(record: dict, where: str, bad: bool) -> RawDoc | Reject:
    content = record.get("content")
    headers, metadata = record.get("warc_headers") or {}, record.get("metadata") or {}
    if not isinstance(content, str):
        return Reject(where, "field 'content' missing or not a string")
    if not isinstance(headers, dict) or not isinstance(metadata, dict):
        return Reject(where, "'warc_headers' or 'metadata' is not a JSON object")
    identification = metadata.get("identification") or {}
    meta = {
        "quality_warnings": _str_list(metadata.get("quality_warnings")),
        "categories": _str_list(metadata.get("categories")),
        "harmful_pp": _float_or_none(metadata.get("harmful_pp")),
        "lang_score": _float_or_none(identification.get("prob") if isinstance(identification, dict) else None),
    }
    doc_id = headers.get("warc-record-id")
    return RawDoc(content, where, doc_id=None if doc_id is None else str(doc_id),
                  url=str(headers.get("warc-target-uri") or ""), num_bad_byte_lines=int(bad), meta=meta)


def _str_list(value) -> list[str]:
    return [str(item) for item in value] if isinstance(value, list) else []


def _float_or_none(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# --- Wikipedia XML dumps --------------------------------------------------------------------


@dataclass
class OpenPage:
    """The bytes of a `<page>` element being collected."""

    offset: int  # stream offset of its "<page>" tag
    parts: list[bytes] = field(default_factory=list)
    num_bytes: int = 0
    problem: str = ""  # set when the page cannot be kept whole

    def add(self, piece: bytes, max_bytes: int) -> None:
        self.num_bytes += len(piece)
        if self.num_bytes > max_bytes:
            self.problem = self.problem or f"page larger than {max_bytes} bytes"
        else:  # past the bound only the count goes on: what is kept still names the page's id
            self.parts.append(piece)


def wiki_docs(split: Split, lines: LineStream, max_bytes: int) -> Iterator[RawDoc | Reject]:
    """The articles of a dump, page by page; a malformed page is rejected and reading goes on."""
    for item in page_chunks(split, lines, max_bytes):
        if isinstance(item, Reject):
            yield item
            continue
        doc = page_doc(split, *item)
        if doc is not None:
            yield doc


def page_chunks(split: Split, lines: LineStream, max_bytes: int) -> Iterator[tuple[int, bytes] | Reject]:
    """(offset of "<page>", the page's bytes) for each page of the split, or a Reject for one that
    cannot be read whole."""
    cutter = PageCutter(split, max_bytes)
    for line in lines:
        yield from cutter.feed(line)
        if cutter.done:
            return
    yield from cutter.pending  # no tag after them: they were not inside a page
    yield from end_of_pages(split, lines, cutter.page)
    if lines.error is None and cutter.page is None and dump_end_missing(split, lines, cutter):
        # A multistream dump cut at a stream boundary decompresses cleanly: only this tells.
        yield Reject(split.where_byte(lines.offset), "dump ends without </mediawiki>: truncated?")


def dump_end_missing(split: Split, lines: LineStream, cutter: PageCutter) -> bool:
    """Whether the dump's tail, read to the end by this split, lacks "</mediawiki>".

    Several splits may read to the end of the file (each reads on to the next "<page>"); only the
    owner of the last page, or the first split if there are no pages, answers, so that a cut file
    is reported once. An empty file lacks nothing.
    """
    answers = cutter.num_pages > 0 or split.start == 0
    return answers and not cutter.saw_dump_end and lines.offset > split.offset


class PageCutter:
    """Cuts `<page>` elements out of a dump's lines. Pages do not nest; the dump puts each tag on a
    line of its own, but a line holding several tags is handled.

    A split that starts mid-file may start inside a page that an earlier split owns and reads to
    its end: until it sees a first tag it cannot tell, so lines too long to read wait in `pending`.
    They are dropped if "</page>" comes first (the earlier split reported its page), else reported.
    """

    def __init__(self, split: Split, max_bytes: int):
        self.split, self.max_bytes = split, max_bytes
        self.page: OpenPage | None = None
        self.done = False  # reached a page that belongs to the next split
        self.unsure = split.start > 0  # no tag seen yet: maybe inside an earlier split's page
        self.pending: list[Reject] = []
        self.saw_dump_end = False  # "</mediawiki>"
        self.num_pages = 0  # pages begun in this split


    def feed(self, line: Line) -> Iterator[tuple[int, bytes] | Reject]:
        if line.raw is None:
            yield from self.skip_long_line(line)
            return
        self.saw_dump_end = self.saw_dump_end or b"</mediawiki>" in line.raw
        pos = 0
        while True:
            if self.page is None:
                tag = self.find_page_start(line, pos)
                if not self.unsure:
                    yield from self.pending
                    self.pending = []
                if tag < 0 or self.done:
                    return
                self.page, pos = OpenPage(line.offset + tag), tag
                self.num_pages += 1
            close = line.raw.find(_PAGE_END, pos)
            end = len(line.raw) if close < 0 else close + len(_PAGE_END)
            self.page.add(line.raw[pos:end], self.max_bytes)
            if close < 0:
                return
            yield finish_page(self.split, self.page)
            self.page, pos = None, end

    def find_page_start(self, line: Line, pos: int) -> int:
        """Index of the next "<page>" in the line (-1: none), past the end of a page begun earlier."""
        tag = line.raw.find(b"<page>", pos)
        close = line.raw.find(_PAGE_END, pos) if self.unsure else -1
        if close >= 0 and (tag < 0 or close < tag):
            self.unsure, self.pending = False, []
            return self.find_page_start(line, close + len(_PAGE_END))
        if tag >= 0:
            self.unsure = False
            self.done = self.split.past_end(line.offset + tag)
        return tag

    def skip_long_line(self, line: Line) -> Iterator[Reject]:
        if self.page is not None:
            self.page.problem = self.page.problem or f"line longer than {self.max_bytes} bytes"
        elif self.split.past_end(line.offset):
            self.done = not self.unsure  # if unsure, read on to the first tag to settle `pending`
        elif self.split.owns(line.offset) and not (line.number == 1 and self.split.first_line_partial):
            # Reported even between pages: a dump that is not one tag per line would hide pages in it.
            reject = too_long(self.split.where_byte(line.offset), self.max_bytes)
            if self.unsure:
                self.pending.append(reject)
            else:
                yield reject


def finish_page(split: Split, page: OpenPage) -> tuple[int, bytes] | Reject:
    if page.problem:
        return Reject(page_where(split, page.offset, b"".join(page.parts)), page.problem)
    return page.offset, b"".join(page.parts)


def end_of_pages(split: Split, lines: LineStream, page: OpenPage | None) -> Iterator[Reject]:
    where = page_where(split, page.offset, b"".join(page.parts)) if page is not None else ""
    if lines.error is not None:
        yield stream_error(split, lines, f"the unfinished page at {where}" if where else "")
    elif where:
        yield Reject(where, "page not closed before the end of the file")


def page_where(split: Split, offset: int, chunk: bytes) -> str:
    """Where a page is: by its id if that can be read, even in a malformed page, else by its offset."""
    match = _PAGE_ID.search(chunk)
    return f"{split.path}:page={match.group(1).decode()}" if match else split.where_byte(offset)


@dataclass
class Page:
    id: str = ""
    title: str = ""
    ns: str = ""
    redirect: bool = False
    text: str = ""


def page_doc(split: Split, offset: int, chunk: bytes) -> RawDoc | Reject | None:
    """The article in one `<page>` element; None for pages that are not articles."""
    text, num_bad = decode_page(chunk)
    try:
        page = parse_page(text)
    except ElementTree.ParseError as e:
        return Reject(page_where(split, offset, chunk), f"malformed XML page: {e}")
    if not (page.id and page.title and page.ns):
        return Reject(page_where(split, offset, chunk), "page without <id>, <title> or <ns>")
    if not is_article(page.ns, page.redirect):
        return None
    where = f"{split.path}:page={page.id}"
    try:
        plain = wikitext_to_text(page.text)
    except Exception as e:  # noqa: BLE001 - a parser bug on one page must not stop a 3 GB dump
        return Reject(where, f"wikitext could not be converted: {type(e).__name__}: {e}")
    url = f"https://ja.wikipedia.org/wiki/{quote(page.title.replace(' ', '_'))}"
    return RawDoc(plain, where, doc_id=page.id, title=page.title, url=url, num_bad_byte_lines=num_bad)


def decode_page(chunk: bytes) -> tuple[str, int]:
    """(page text, number of its lines with invalid UTF-8, decoded with U+FFFD)."""
    try:
        return chunk.decode("utf-8"), 0
    except UnicodeDecodeError:
        lines = chunk.split(b"\n")
        return chunk.decode("utf-8", errors="replace"), sum(decode_line(line)[1] for line in lines)


def parse_page(text: str) -> Page:
    """The fields of a `<page>` element (of its last revision, if a history dump has several)."""
    page = Page()
    for child in ElementTree.fromstring(text):
        name = local_name(child.tag)
        if name in ("id", "title", "ns"):
            setattr(page, name, (child.text or "").strip())
        elif name == "redirect":
            page.redirect = True
        elif name == "revision":
            texts = [el for el in child if local_name(el.tag) == "text"]
            page.text = (texts[-1].text or "") if texts else ""
    return page


def local_name(tag: str) -> str:
    """Tag name without its "{namespace}" prefix: pages cut out of the dump carry no xmlns."""
    return tag.rpartition("}")[2]
