"""The C whitespace clean-up (data_prep/_whitespace.c): the same strings as `clean_whitespace`
(the per-string reference) and as the Arrow-kernel fallback, on every code point and on fuzz."""
from __future__ import annotations

import random

import pyarrow as pa
import pytest

from data_prep import clean
from data_prep.clean import SPACES, _clean_whitespace_column_arrow, clean_whitespace

NOT_BUILT = ("data_prep._whitespace (the C extension) is not importable: run `make setup` "
             "(it builds it next to data_prep/_whitespace.c; needs a C compiler)")


def native(texts: pa.Array) -> pa.Array:
    assert clean._whitespace is not None, NOT_BUILT
    return clean.clean_whitespace_column(texts)


def check_all_three(texts: list[str], type_: pa.DataType = pa.string()) -> None:
    column = pa.array(texts, type_)
    expected = [clean_whitespace(t) for t in texts]
    out = native(column)
    assert out.type == type_
    out.validate(full=True)
    assert out.to_pylist() == expected
    assert _clean_whitespace_column_arrow(column).to_pylist() == expected


def test_extension_is_built():
    assert clean._whitespace is not None, NOT_BUILT


# --- every code point --------------------------------------------------------------------

CODE_POINTS = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]


def test_every_code_point_alone_and_between_content():
    """str.isspace() characters but "\\n" are whitespace to the C cleaner, every other is content."""
    assert set(SPACES) == {c for c in CODE_POINTS if c.isspace()} - {"\n"}
    alone = native(pa.array(CODE_POINTS, pa.string())).to_pylist()
    assert alone == ["" if c.isspace() else c for c in CODE_POINTS]
    # Between a multi-byte character and an ASCII one: a space becomes " ", "\n" stays a line break.
    between = native(pa.array(["猫" + c + "a" for c in CODE_POINTS], pa.string())).to_pylist()
    assert between == ["猫\na" if c == "\n" else "猫 a" if c.isspace() else "猫" + c + "a" for c in CODE_POINTS]


def test_every_code_point_in_long_texts():
    """The same in texts long enough for the 16-bytes-at-a-time path, the code point at 7
    positions of a 16-byte block (8-9 bytes per 3 code points) and next to kana."""
    texts = ["x" * (c % 7) + "あい" + ch + "う" * 6 + ch + ch + "abc" * 6 for c, ch in enumerate(CODE_POINTS)]
    assert native(pa.array(texts, pa.string())).to_pylist() == [clean_whitespace(t) for t in texts]


@pytest.mark.parametrize("type_", [pa.string(), pa.large_string()])
def test_each_space_at_each_position_of_a_block(type_):
    # U+3000 is looked at with the two bytes after it, at the end of a block too; E3 80 81 ("、")
    # and E3 81 80 ("぀") share its first byte(s).
    texts = [pad + c + rest for c in SPACES + "\n" + "、぀\u2000\u2080\u1680\u1690\xa0\xa1"
             for n in range(0, 40) for pad in ("x" * n, "あ" * (n // 3) + "x" * (n % 3))
             for rest in ("y" * 40, c + "う" * 10, "")]
    check_all_three(texts, type_)


# --- edge cases -------------------------------------------------------------------------

EDGE_TEXTS = [
    "", " ", "\n", "\n\n", " \n \n", "\u3000", "\u3000\n\u3000", "\r\n", "\r\n\r\n",  # only whitespace
    "a", " a", "a ", " a ", "\n a \n", "\u3000\u3000a\u3000\u3000",  # leading / trailing
    "a  b", "a\tb", "a\u3000\u3000b", "a\xa0b", "a \u2003 b", "a\x1c\x1fb", "x\x85y\u2028z\u2029w",
    "line one\r\nline two\r\n", "a\r\n\r\nb",  # "\r\n" endings
    "\u3000吾輩は猫である。\n\u3000名前はまだ無い。\n",  # U+3000 indents
    "a \n\n b", "a\n \n\t\n\u3000\nb", " \n a \n \n b c \n ",  # runs mixing newlines and spaces
    "猫\u3000犬", "猫 \u3000 犬", "。\u3000「", "🐈\u2009🐕", "ア\xa0イ", "é\x85è",  # multi-byte next to spaces
]


@pytest.mark.parametrize("type_", [pa.string(), pa.large_string()])
def test_edge_cases(type_):
    check_all_three(EDGE_TEXTS, type_)


def random_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = (list(SPACES) + [" "] * 10 + ["\n"] * 10 + ["\r\n"] * 2 + list("abcXYZ019.,")
                + list("あいうアイウｱ") + list("猫犬吾輩") + ["😀", "🐈", "👍🏽"] + ["\u3000"] * 5
                + ["吾輩は猫である。名前はまだ無い。", "The quick brown fox", "「ｶﾀｶﾅ」…―※", "a·b", "x é y"])
    # Mostly short, some long enough for the 16-bytes-at-a-time path to run many blocks.
    return ["".join(rng.choice(alphabet) for _ in range(rng.choice((rng.randint(0, 40), rng.randint(0, 400)))))
            for _ in range(count)]


@pytest.mark.parametrize("type_", [pa.string(), pa.large_string()])
def test_random_texts(type_):
    check_all_three(random_texts(seed=7, count=4000), type_)


def test_sliced_array_empty_array_and_nulls():
    texts = EDGE_TEXTS + random_texts(seed=8, count=20)
    for type_ in (pa.string(), pa.large_string()):
        column = pa.array(texts, type_)
        for start, length in ((3, 5), (0, 0), (7, len(texts) - 7), (len(texts), 0)):
            part = column.slice(start, length)
            out = native(part)
            out.validate(full=True)
            assert out.type == type_
            assert out.to_pylist() == [clean_whitespace(t) for t in texts[start:start + length]]
            assert out.to_pylist() == _clean_whitespace_column_arrow(part).to_pylist()
        with_nulls = pa.array([None, " a  b ", None, "", "\u3000c"], type_)
        assert native(with_nulls).to_pylist() == ["", "a b", "", "", "c"]
        assert _clean_whitespace_column_arrow(with_nulls).to_pylist() == ["", "a b", "", "", "c"]


# --- the C function itself ----------------------------------------------------------------

def offsets(values: list[int], width: int = 4) -> bytes:
    return b"".join(v.to_bytes(width, "little", signed=True) for v in values)


def c_clean(data: bytes, offs: bytes, width: int = 4, out_size: int | None = None) -> tuple[bytes, bytes]:
    """The C function on bytes: (its output data, its output offsets)."""
    assert clean._whitespace is not None, NOT_BUILT
    out_data, out_offsets = bytearray(len(data) if out_size is None else out_size), bytearray(len(offs))
    written = clean._whitespace.clean(data, offs, width, out_data, out_offsets)
    return bytes(out_data[:written]), bytes(out_offsets)


@pytest.mark.parametrize("width", [4, 8])
def test_c_function_offsets_need_not_start_at_zero(width):
    assert c_clean(b"xx a  b\n\n c  ", offsets([2, 13, 13], width), width) == (b"a b\nc", offsets([0, 5, 5], width))
    # The output buffer needs room for the strings' bytes only.
    assert c_clean(b"xx a  b\n\n c  ", offsets([2, 13, 13], width), width, out_size=11)[0] == b"a b\nc"


def test_c_function_never_reads_past_a_string():
    """A multi-byte space cut by the end of a string is content (invalid UTF-8 copied as is)."""
    data = b"\xe3\x80\x80\xe3\x80\x80\xc2\xe2\x80"
    out, out_offsets = c_clean(data, offsets([0, 2, 6, 7, 9]))
    assert out == b"\xe3\x80" + b"\x80" + b"\xc2" + b"\xe2\x80"
    assert out_offsets == offsets([0, 2, 3, 4, 6])


@pytest.mark.parametrize("bad", [
    ([0, 3, 2], 4),  # decreasing
    ([0, 2, 99], 4),  # past the data buffer
    ([-1, 2], 4),  # before it
    ([0, 2, 99], 8),
    ([3, 2], 8),
])
def test_c_function_rejects_bad_offsets(bad):
    values, width = bad
    with pytest.raises(ValueError):
        c_clean(b"abcde", offsets(values, width), width)


def test_c_function_rejects_bad_buffers():
    with pytest.raises(ValueError):
        c_clean(b"abc", b"")  # no offsets at all (n + 1 >= 1)
    with pytest.raises(ValueError):
        c_clean(b"abc", b"\0" * 6)  # not a whole number of offsets
    with pytest.raises(ValueError):
        c_clean(b"abc", b"\0" * 8, width=2)  # no such width
    with pytest.raises(ValueError):
        c_clean(b"a  b", offsets([0, 4]), out_size=3)  # no room for the input's 4 bytes
    with pytest.raises(TypeError):
        c_clean("abc", offsets([0, 3]))  # str has no buffer
    with pytest.raises(BufferError):  # read-only output
        clean._whitespace.clean(b"abc", offsets([0, 3]), 4, b"xyz", bytearray(8))
    shared = bytearray(b"a  b" + offsets([0, 4]))
    with pytest.raises(ValueError):  # the output would overwrite the input
        clean._whitespace.clean(shared, memoryview(shared)[4:], 4, shared, bytearray(8))


def test_without_the_extension_the_arrow_version_stands_in(monkeypatch):
    monkeypatch.setattr(clean, "_whitespace", None)  # as on a machine that could not compile it
    for type_ in (pa.string(), pa.large_string()):
        out = clean.clean_whitespace_column(pa.array(EDGE_TEXTS, type_))
        assert out.type == type_
        assert out.to_pylist() == [clean_whitespace(t) for t in EDGE_TEXTS]
