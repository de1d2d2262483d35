"""Generic JSON lines parsed a block of whole lines at a time, in C: data_prep/_jsonlines.c,
else (without the extension, or for a block it will not vouch for) Arrow's JSON reader.

The per-line reader (`readers.json_line_docs`: orjson, the json module's last word, one RawDoc
per line) spends ~50 µs of Python on each line, a sixth of what SentencePiece then spends on the
document. Here one call parses a few MB of lines, and the texts stay an Arrow column all the way
to the docs file, the hash and the tokenizer.

The result must be exactly the per-line reader's, so a block is taken only when Arrow's reading
can be vouched for; otherwise `read_block` returns None and the caller reads that block line by
line (correct, only slower). A block is taken when:

- every line of the split in it starts with "{" or is empty: a blank line of spaces, a BOM in
  mid-file or a non-object line is the per-line reader's to judge;
- its bytes are valid UTF-8: the per-line reader decodes bad bytes with U+FFFD and counts them,
  in whatever field they are, while Arrow would keep them;
- Arrow parses it with the text field, `title` and `url` as strings and `id` as strings, or as
  integers throughout the block (str() of a Python int is the same digits). Arrow refuses what the
  json module would read differently or reject: a number where a string is expected, duplicate
  keys, lone surrogates, control characters, trailing garbage;
- it finds one object per "{" line (two objects on one line are "Extra data" to the json module)
  and no null text (a missing or null text field is a reject).

The C scanner takes a block on the same conditions (its header lists them), UTF-8 checked as it
goes, and reads it ~4x as fast as Arrow: most of a line is its text, copied in runs between
escapes.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.json as pa_json

try:  # built by `make setup` (setup.py); without it Arrow reads every block
    from data_prep import _jsonlines
except ImportError:
    _jsonlines = None

# Whole lines per Arrow call: large enough that the per-call cost vanishes, small enough that a
# block, its parsed table and the worker's batch stay a few tens of MB.
BLOCK_BYTES = 4 * 2**20
# The fields a generic JSON-lines document takes besides its text (readers.generic_record).
DOC_FIELDS = ("id", "title", "url")
_OPEN_BRACE, _NEWLINE = ord("{"), ord("\n")
UTF8_BOM = b"\xef\xbb\xbf"
_ID_IS_A_NUMBER = "Column(/id) changed from string to number"


@dataclass
class DocBatch:
    """Consecutive documents of one block, column by column; no reject among them."""

    texts: pa.StringArray
    doc_ids: list[str | None]  # None: no id field (the worker makes one)
    titles: pa.StringArray  # "" where absent, as readers.generic_record
    urls: pa.StringArray
    line_offsets: list[int]  # stream offset of each document's line
    line_numbers: list[int]  # and its 1-based number, for `where`

    def __len__(self) -> int:
        return len(self.texts)


def can_read_blocks(text_field: str) -> bool:
    """Blocks need the text field apart from the document fields (their types differ)."""
    return text_field not in DOC_FIELDS


def find_line_starts(data: bytes) -> list[int]:
    """Offset of each line's first byte; a final newline starts no line."""
    starts = [0] if data else []
    pos = data.find(b"\n")
    while pos != -1 and pos + 1 < len(data):
        starts.append(pos + 1)
        pos = data.find(b"\n", pos + 1)
    return starts


def bom_length(data: bytes, at_stream_start: bool) -> int:
    """Bytes of the UTF-8 BOM that `data` starts with, if it starts the stream: the per-line reader
    drops it, and neither Arrow nor the C scanner would take it."""
    return len(UTF8_BOM) if at_stream_start and data.startswith(UTF8_BOM) else 0


def find_object_lines(data: bytes, starts: list[int], lo: int, hi: int, max_line_bytes: int,
                      at_stream_start: bool) -> list[int] | None:
    """Indices of the lines in [lo, hi) that hold a JSON object, or None if any line of the range
    is not a "{" line or an empty one, or is too long for the per-line reader to keep."""
    rows = []
    for i in range(lo, hi):
        begin, end = starts[i], starts[i + 1] if i + 1 < len(starts) else len(data)
        if end - begin > max_line_bytes:
            return None
        if i == 0:
            begin += bom_length(data, at_stream_start)
        first = data[begin] if begin < end else _NEWLINE
        if first == _OPEN_BRACE:
            rows.append(i)
        elif first != _NEWLINE or end - begin != 1:
            return None
    return rows


class BlockParser:
    """A block's documents: by the C scanner (data_prep/_jsonlines.c), else by Arrow's JSON reader
    with the schema a generic JSON-lines document needs."""

    def __init__(self, text_field: str):
        self.text_field = text_field
        self.id_type = pa.string()  # becomes int64 for a corpus of integer ids, once seen

    def parse(self, data: memoryview, line_offsets: list[int], line_numbers: list[int]) -> DocBatch | None:
        """The documents of `data` (whole lines, one object on each line at `line_offsets`), or None."""
        num_rows = len(line_offsets)
        scanned = _jsonlines.scan(data, self.text_field.encode()) if _jsonlines is not None else None
        if scanned is not None:  # it checked the UTF-8 as it went
            return self._from_scan(scanned, line_offsets, line_numbers)
        buffer = pa.py_buffer(data)
        if not is_utf8(buffer):
            return None
        table = self._read(buffer)
        if table is None or table.num_rows != num_rows:
            return None
        texts = table.column(self.text_field).combine_chunks()
        if texts.null_count:
            return None
        ids = table.column("id").to_pylist()
        if self.id_type != pa.string():
            ids = [None if value is None else str(value) for value in ids]
        titles, urls = (table.column(name).combine_chunks().fill_null("") for name in ("title", "url"))
        return DocBatch(texts, ids, titles, urls, line_offsets, line_numbers)

    @staticmethod
    def _from_scan(scanned: tuple, line_offsets: list[int], line_numbers: list[int]) -> DocBatch | None:
        offsets, chars, ids, titles, urls = scanned
        if len(ids) != len(line_offsets):
            return None
        texts = pa.Array.from_buffers(pa.string(), len(ids), [None, pa.py_buffer(offsets), pa.py_buffer(chars)])
        return DocBatch(texts, ids, pa.array(titles, pa.string()), pa.array(urls, pa.string()), line_offsets, line_numbers)

    def _read(self, buffer: pa.Buffer) -> pa.Table | None:
        for id_type in dict.fromkeys([self.id_type, pa.int64()]):
            fields = [(self.text_field, pa.string()), ("id", id_type), ("title", pa.string()), ("url", pa.string())]
            options = pa_json.ParseOptions(explicit_schema=pa.schema(fields), unexpected_field_behavior="ignore")
            try:
                table = pa_json.read_json(pa.BufferReader(buffer), parse_options=options, read_options=pa_json.ReadOptions(
                    use_threads=False, block_size=len(buffer) + 1))  # one block: rows in file order
            except pa.ArrowInvalid as err:
                if _ID_IS_A_NUMBER in str(err):
                    continue
                return None
            self.id_type = id_type
            return table
        return None


def is_utf8(buffer: pa.Buffer) -> bool:
    """Arrow's UTF-8 check of the whole buffer (~1 GB/s), as one string."""
    offsets = pa.py_buffer(struct.pack("<qq", 0, len(buffer)))
    try:
        pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, buffer]).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True
