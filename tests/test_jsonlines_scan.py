"""data_prep/_jsonlines.c on its own: the lines it takes are read as the json module reads them
(through readers.generic_record), and it declines the rest. tests/test_json_blocks.py checks the
block reader with and without it against the per-line reader."""
from __future__ import annotations

import json
import random

import orjson
import pytest

from data_prep import json_blocks
from data_prep.readers import generic_record
from test_json_blocks import GOOD

if json_blocks._jsonlines is None:
    pytest.fail("data_prep._jsonlines is not built: run `make setup`", pytrace=False)
scan = json_blocks._jsonlines.scan


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


def test_takes_every_ordinary_line_and_reads_it_as_the_json_module():
    """3000 random lines: the scanner takes exactly the ordinary ones (is_ordinary), and reads
    each as generic_record reads the json module's parse: text, id, title and url."""
    rng = random.Random(0)
    taken = 0
    for _ in range(3000):
        line, fields = random_line(rng)
        got = scan(line + b"\n", b"text")
        assert (got is not None) == is_ordinary(fields), line
        if got is None:
            continue
        doc = generic_record(json.loads(line), "", False, "text")
        offsets, chars, ids, titles, urls = got
        assert chars.decode() == doc.text and len(offsets) == 8, line
        assert (ids, titles, urls) == ([doc.doc_id], [doc.title], [doc.url]), line
        taken += 1
    assert taken > 500


def test_takes_a_block_or_declines_it_whole():
    good = [g.encode() for g in GOOD]
    got = scan(b"\n".join(good[:2]) + b"\n\n" + good[2] + b"\n", b"text")
    assert got is not None and len(got[2]) == 3
    texts = [orjson.loads(g)["text"] for g in GOOD]
    offsets = [int.from_bytes(got[0][i:i + 4], "little") for i in range(0, 16, 4)]
    assert [got[1][a:b].decode() for a, b in zip(offsets, offsets[1:])] == texts
    assert scan(b'{"te\\u0078t": "escaped key"}\n', b"text")[1] == b"escaped key"
    for tricky in [b'{"text": "a"} {"text": "b"}', b'{"text": "\\ud800"}', b'\xef\xbb\xbf{"text": "BOM"}',
                   b'{"text": "a", "junk": NaN}', b'{"text": "a", "te\\u0078t": "b"}', b'{"id": -0, "text": "a"}',
                   b'{"text": "a", "id": 1.0}', b'{"text": "a", "text": "b"}', b'{"text": "tab\there"}',
                   b'{"text": "a", "deep": ' + b"[" * 300 + b"]" * 300 + b"}", b'{"text": "cut']:
        assert scan(good[0] + b"\n" + tricky + b"\n", b"text") is None, tricky


def test_takes_exactly_the_valid_utf8():
    """Every byte pair (with a few continuations after it) inside a text: taken exactly when
    Python's strict decoder reads it, which follows the same table (no overlong forms, no
    surrogates, nothing above U+10FFFF); the scanner has no separate UTF-8 pass to fall back on."""
    for b0 in range(0x80, 0x100):
        for b1 in range(0x100):
            for tail in (b"", b"\x80", b"\xbf\xbf", b"A"):
                seq = bytes([b0, b1]) + tail
                try:
                    valid = all(ch >= " " and ch not in '"\\' for ch in seq.decode("utf-8"))
                except UnicodeDecodeError:
                    valid = False
                assert (scan(b'{"text": "' + seq + b'"}\n', b"text") is not None) == valid, seq


@pytest.mark.parametrize("where", ["text", "key", "other value", "title", "id", "outside a string"])
def test_declines_bad_utf8_wherever_it_is(where):
    line = {"text": b'{"text": "a%sb", "n": 1}', "key": b'{"a%sb": 1, "text": "t"}',
            "other value": b'{"x": ["a%sb"], "text": "t"}', "title": b'{"title": "a%sb", "text": "t"}',
            "id": b'{"id": "a%sb", "text": "t"}', "outside a string": b'{"text": "t"%s}'}[where]
    assert scan(line.replace(b"%s", "猫".encode()) + b"\n", b"text") is not None or where == "outside a string"
    for bad in (b"\xff", b"\x80", b"\xc0\xaf", b"\xe3\x81", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80"):
        assert scan(line.replace(b"%s", bad) + b"\n", b"text") is None, (where, bad)
