"""Generic JSON lines read in blocks (data_prep/json_blocks.py: the C scanner, else Arrow's JSON
reader) give exactly what the per-line reader gives, whatever the lines, the splits and the
block size. Every test here runs twice: with the C scanner, and with Arrow's reader alone (as
where the extension could not be built)."""
from __future__ import annotations

import json
import random

import orjson
import pytest

import data_prep.json_blocks as json_blocks
import data_prep.readers as readers
from data_prep.json_blocks import DocBatch, find_line_starts
from data_prep.readers import generic_record, plan_splits, read_split, read_split_batches


@pytest.fixture(autouse=True, params=["c", "arrow"])
def block_reader(request, monkeypatch):
    if request.param == "c":
        if json_blocks._jsonlines is None:
            pytest.fail("data_prep._jsonlines is not built: run `make setup`")
    else:
        monkeypatch.setattr(json_blocks, "_jsonlines", None)
    return request.param

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


def test_clean_lines_come_as_one_batch_with_their_fields(tmp_path, monkeypatch):
    path = tmp_path / "c.jsonl"
    write_lines(path, [b'\xef\xbb\xbf' + GOOD[0].encode(), b"", *[g.encode() for g in GOOD[1:]]])
    items = list(read_split_batches(path, "jsonl"))
    assert len(items) == 1 and isinstance(items[0], DocBatch) and len(items[0]) == 3
    docs = assert_same_as_per_line(monkeypatch, path)
    assert [(d.doc_id, d.title, d.url, d.where) for d in docs] == [
        ("a1", "猫", "https://example.org/1", f"{path}:1"), (None, "", "", f"{path}:3"), (None, "", "", f"{path}:4")]


def test_integer_ids_stay_on_arrow_and_read_as_str_of_int(tmp_path, monkeypatch):
    path = tmp_path / "c.jsonl"
    write_lines(path, [f'{{"id": {i}, "text": "文 {i}"}}'.encode() for i in (3, -0, 12)])
    assert all(isinstance(item, DocBatch) for item in read_split_batches(path, "jsonl"))
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


# --- the C scanner alone, against the json module ------------------------------------------

def random_string(rng: random.Random) -> str:
    alphabet = ["a", "Z", " ", "猫", "é", "😀", "\n", "\t", '"', "\\", "/", "\u0000", "\u001f", "\u007f", "\u2028"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return random_string(rng)
    if kind == 1:
        return rng.choice([0, 7, -3, 10**17, 10**19, -(10**20)])
    if kind == 2:
        return rng.choice([0.5, -1e-3, 1e300, 2.0])
    if kind in (3, 4, 5):
        return rng.choice([None, True, False])
    if kind in (6, 7):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {random_string(rng): random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def random_line(rng: random.Random) -> tuple[bytes, list[tuple]]:
    """A JSON object with a text field (usually a string), often id/title/url of any type, and
    other fields, with random spacing and escaping, sometimes a key named twice; and its fields."""
    fields = [("text", random_string(rng) if rng.random() < 0.9 else random_value(rng))]
    for name in ("id", "title", "url"):
        if rng.random() < 0.5:
            fields.append((name, rng.choice([random_string(rng), random_value(rng)])))
    fields += [(random_string(rng), random_value(rng)) for _ in range(rng.randrange(0, 3))]
    if rng.random() < 0.05:
        fields.append(rng.choice(fields))  # a key named twice
    rng.shuffle(fields)
    sep = rng.choice([(",", ":"), (", ", ": "), (" ,\t", " :\r ")])
    body = sep[0].join(json.dumps(k, ensure_ascii=rng.random() < 0.5) + sep[1] + json.dumps(v, ensure_ascii=rng.random() < 0.5)
                       for k, v in fields)
    return ("{" + body + "}" + rng.choice(["", " ", "\r"])).encode(), fields


def is_ordinary(fields: list[tuple]) -> bool:
    """What the scanner must take (_jsonlines.c): a string text; id, title and url absent, null
    or strings (an id also an integer of at most 18 digits); none of the four named twice."""
    names = [name for name, _ in fields if name in ("text", "id", "title", "url")]
    values = dict(fields)
    doc_id = values.get("id")
    return (len(names) == len(set(names)) and isinstance(values["text"], str)
            and all(values.get(name) is None or isinstance(values[name], str) for name in ("title", "url"))
            and (doc_id is None or isinstance(doc_id, str)
                 or (type(doc_id) is int and len(str(abs(doc_id))) <= 18)))


def test_c_scanner_takes_every_ordinary_line_and_reads_it_as_the_json_module(block_reader):
    """3000 random lines: the scanner takes exactly the ordinary ones (is_ordinary), and reads
    each as generic_record reads the json module's parse: text, id, title and url."""
    if block_reader != "c":
        pytest.skip("the C scanner's own test")
    rng = random.Random(0)
    taken = 0
    for _ in range(3000):
        line, fields = random_line(rng)
        got = json_blocks._jsonlines.scan(line + b"\n", b"text")
        assert (got is not None) == is_ordinary(fields), line
        if got is None:
            continue
        doc = generic_record(json.loads(line), "", False, "text")
        offsets, chars, ids, titles, urls = got
        assert chars.decode() == doc.text and len(offsets) == 8, line
        assert (ids, titles, urls) == ([doc.doc_id], [doc.title], [doc.url]), line
        taken += 1
    assert taken > 500


def test_c_scanner_takes_a_block_or_declines_it_whole(block_reader):
    if block_reader != "c":
        pytest.skip("the C scanner's own test")
    good = [g.encode() for g in GOOD]
    got = json_blocks._jsonlines.scan(b"\n".join(good[:2]) + b"\n\n" + good[2] + b"\n", b"text")
    assert got is not None and len(got[2]) == 3
    texts = [orjson.loads(g)["text"] for g in GOOD]
    offsets = [int.from_bytes(got[0][i:i + 4], "little") for i in range(0, 16, 4)]
    assert [got[1][a:b].decode() for a, b in zip(offsets, offsets[1:])] == texts
    assert json_blocks._jsonlines.scan(b'{"te\\u0078t": "escaped key"}\n', b"text")[1] == b"escaped key"
    for tricky in [b'{"text": "a"} {"text": "b"}', b'{"text": "\\ud800"}', b'\xef\xbb\xbf{"text": "BOM"}',
                   b'{"text": "a", "junk": NaN}', b'{"text": "a", "te\\u0078t": "b"}', b'{"id": -0, "text": "a"}',
                   b'{"text": "a", "id": 1.0}', b'{"text": "a", "text": "b"}', b'{"text": "tab\there"}',
                   b'{"text": "a", "deep": ' + b"[" * 300 + b"]" * 300 + b"}", b'{"text": "cut']:
        assert json_blocks._jsonlines.scan(good[0] + b"\n" + tricky + b"\n", b"text") is None, tricky
