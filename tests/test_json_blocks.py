"""Generic JSON lines read in blocks (data_prep/json_blocks.py: the C scanner, else Arrow's JSON
reader) give exactly what the per-line reader gives, whatever the lines, the splits and the
block size. Every test here runs twice: with the C scanner, and with Arrow's reader alone (as
where the extension could not be built)."""
from __future__ import annotations

import pytest

import data_prep.json_blocks as json_blocks
import data_prep.readers as readers
from data_prep.json_blocks import DocBatch, find_line_starts
from data_prep.readers import plan_splits, read_split, read_split_batches


class CountingScanner:
    """data_prep._jsonlines, counting the blocks its scan took."""

    def __init__(self, module):
        self.module, self.taken = module, 0

    def scan(self, data, text_field):
        result = self.module.scan(data, text_field)
        self.taken += result is not None
        return result


@pytest.fixture(autouse=True, params=["c", "arrow"])
def block_reader(request, monkeypatch) -> CountingScanner | None:
    if request.param == "arrow":
        monkeypatch.setattr(json_blocks, "_jsonlines", None)
        return None
    if json_blocks._jsonlines is None:
        pytest.fail("data_prep._jsonlines is not built: run `make setup`")
    scanner = CountingScanner(json_blocks._jsonlines)
    monkeypatch.setattr(json_blocks, "_jsonlines", scanner)
    return scanner

GOOD = ['{"id": "a1", "title": "猫", "url": "https://example.org/1", "text": "吾輩は猫である。\\n名前はまだ無い。"}',
        '{"text": "どこで生れたかとんと見当がつかぬ。", "extra": {"nested": [1, 2]}}',
        '{"title": null, "text": "何でも薄暗いじめじめした所で", "score": 0.5}']

# Each line is read by the per-line reader as a document, a reject or nothing; the block reader
# must either agree or hand the block to the per-line reader.
TRICKY = [
    '{"id": 7, "text": "int id"}', '{"id": 123456789012345678901234567890, "text": "big int id"}',
    '{"id": 1.5, "text": "float id"}', '{"id": true, "text": "bool id"}', '{"id": "", "text": "empty id"}',
    '{"title": 5, "text": "number title"}', '{"title": 0, "text": "falsy title"}', '{"url": ["x"], "text": "list url"}',
    '{"text": null}', '{"other": "no text"}', '{"text": 5}', '{"text": "a", "text": "b"}',
    '{"text": "one"} {"text": "two"}', '{"text": "x"} trailing', '[1, 2]', '7', '"string"',
    '{"text": "\\ud800"}', '{"text": "\\ud83d\\ude00 pair"}', '{"text": NaN}', '{"text": "ok", "junk": NaN}',
    '{"text": "ok", "junk": Infinity}', '{"text": "ok", "junk": 1e999}', '{"te\\u0078t": "escaped key"}',
    '{"text": "tab\there"}', '{"text": "nul \\u0000 escaped"}', '{"text": "cut', '', '   ', '\u3000',
    '\ufeff{"text": "BOM in mid-file"}', '{"text": "mixed junk", "m": 1}', '{"text": "mixed junk", "m": "s"}',
]
BAD_BYTES = [b'{"text": "caf\xe9"}', b'{"text": "ok", "junk": "\xff"}', b'{"text": "cr"}\r', b'\r']


def write_lines(path, lines: list[bytes], final_newline: bool = True) -> None:
    path.write_bytes(b"\n".join(lines) + (b"\n" if final_newline else b""))


def read_per_line(monkeypatch, *args, **kwargs) -> list:
    with monkeypatch.context() as patch:
        patch.setattr(readers, "_reads_blocks", lambda *a: False)
        return list(read_split(*args, **kwargs))


def assert_same_as_per_line(monkeypatch, path, **kwargs):
    expected = read_per_line(monkeypatch, path, "jsonl", **kwargs)
    got = list(read_split(path, "jsonl", **kwargs))
    assert repr(got) == repr(expected)  # repr: every field, and NaN == NaN
    return got


@pytest.mark.parametrize("tricky", [line.encode() for line in TRICKY] + BAD_BYTES)
def test_every_line_reads_as_the_per_line_reader_reads_it(tmp_path, monkeypatch, tricky):
    path = tmp_path / "c.jsonl"
    write_lines(path, [g.encode() for g in GOOD] + [tricky] + [g.encode() for g in GOOD])
    assert_same_as_per_line(monkeypatch, path)


def test_clean_lines_come_as_one_batch_with_their_fields(tmp_path, monkeypatch, block_reader):
    path = tmp_path / "c.jsonl"
    write_lines(path, [b'\xef\xbb\xbf' + GOOD[0].encode(), b"", *[g.encode() for g in GOOD[1:]]])
    items = list(read_split_batches(path, "jsonl"))
    assert len(items) == 1 and isinstance(items[0], DocBatch) and len(items[0]) == 3
    assert block_reader is None or block_reader.taken == 1  # the file's BOM left out of the scan
    docs = assert_same_as_per_line(monkeypatch, path)
    assert [(d.doc_id, d.title, d.url, d.where) for d in docs] == [
        ("a1", "猫", "https://example.org/1", f"{path}:1"), (None, "", "", f"{path}:3"), (None, "", "", f"{path}:4")]


def test_integer_ids_stay_on_arrow_and_read_as_str_of_int(tmp_path, monkeypatch, block_reader):
    path = tmp_path / "c.jsonl"
    write_lines(path, [f'{{"id": {i}, "text": "文 {i}"}}'.encode() for i in (3, -0, 12)])
    assert all(isinstance(item, DocBatch) for item in read_split_batches(path, "jsonl"))
    assert block_reader is None or block_reader.taken == 1  # the C scanner read the block
    assert [d.doc_id for d in assert_same_as_per_line(monkeypatch, path)] == ["3", "0", "12"]


def test_a_text_field_named_like_a_document_field_is_read_per_line(tmp_path, monkeypatch):
    path = tmp_path / "c.jsonl"
    write_lines(path, [b'{"title": "the text", "id": 1}'])
    assert not any(isinstance(item, DocBatch) for item in read_split_batches(path, "jsonl", text_field="title"))
    assert_same_as_per_line(monkeypatch, path, text_field="title")


@pytest.mark.parametrize("slack_bytes", [1, 40, 2**18])
@pytest.mark.parametrize("block_bytes", [16, 64, 100, 1000])
@pytest.mark.parametrize("unit_bytes", [1, 50, 333, 10**6])
def test_any_split_and_block_size_reads_the_same(tmp_path, monkeypatch, block_bytes, unit_bytes, slack_bytes):
    """Blocks cut mid-line, lines longer than a block, splits starting mid-line, over-long lines,
    a last line without its newline, blocks cut short near a split's end: the items equal the
    per-line reader's, split by split."""
    monkeypatch.setattr(readers, "BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(readers, "BLOCK_SLACK_BYTES", slack_bytes)
    path = tmp_path / "c.jsonl"
    lines = [g.encode() for g in GOOD] * 3 + [line.encode() for line in TRICKY[:12]] + BAD_BYTES
    lines.insert(5, b'{"text": "' + "長".encode() * 400 + b'"}')  # over max_line_bytes below
    write_lines(path, lines, final_newline=False)
    for start, end in plan_splits(path, "jsonl", unit_bytes):
        expected = read_per_line(monkeypatch, path, "jsonl", start, end, max_line_bytes=900)
        got = list(read_split(path, "jsonl", start, end, max_line_bytes=900))
        assert repr(got) == repr(expected)


def test_find_line_starts():
    assert find_line_starts(b"") == []
    assert find_line_starts(b"a\nbc\n") == [0, 2]
    assert find_line_starts(b"a\n\nbc") == [0, 2, 3]


def test_docs_worker_writes_the_same_unit_either_way(tmp_path, monkeypatch):
    """The docs worker's outputs (documents, ids, stats, rejects, hashes) do not depend on how the
    lines were read."""
    import json

    import numpy as np
    import pyarrow as pa

    from data_prep.config import DataConfig
    from data_prep.units import Unit
    from data_prep.worker import UnitProcessor

    path = tmp_path / "c.jsonl"
    lines = [g.encode() for g in GOOD] * 4 + [line.encode() for line in TRICKY] + BAD_BYTES + [GOOD[0].encode()]
    write_lines(path, lines)
    data = DataConfig(inputs=[{"path": str(path), "format": "jsonl"}], output_dir=str(tmp_path / "out"))
    unit = Unit(0, 0, str(path), "jsonl", 0, None, "c")

    def run(name: str) -> dict:
        work_dir = tmp_path / name
        work_dir.mkdir()
        UnitProcessor(data).run(unit, work_dir)
        out = work_dir / unit.name
        stats = json.loads((out / "stats.json").read_text())
        stats.pop("wall_s")
        return {"docs": pa.ipc.open_stream(out / "docs.arrow").read_all().to_pylist(), "stats": stats,
                "rejects": (out / "rejects.jsonl").read_text(), "hashes": np.load(out / "hashes.npy").tolist()}

    blocks = run("blocks")
    with monkeypatch.context() as patch:
        patch.setattr(readers, "_reads_blocks", lambda *a: False)
        per_line = run("per-line")
    assert blocks == per_line
    assert blocks["stats"]["num_docs_out"] > 12 and blocks["stats"]["num_rejected"] > 5
