"""data_prep.sp_encode and its C table (data_prep/_spm_premap.c): the same ids as the model's
own encode on every code point in several contexts, on the decomposed forms its longer rules
are made of, on random text and bytes and on the sample corpus; and the table against the
model's charsmap read by a Python reference."""
from __future__ import annotations

import random
import struct
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from data_prep import sp_encode
from data_prep.config import TokenizerConfig
from data_prep.sp_encode import Encoder
from data_prep.tokenizer import train_sentencepiece

NEKO = Path(__file__).resolve().parents[1] / "data_prep" / "samples" / "neko.txt"
NOT_BUILT = ("data_prep._spm_premap (the C extension) is not importable: run `make setup` "
             "(it builds it next to data_prep/_spm_premap.c; needs a C compiler)")
CODE_POINTS = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
NUM_CODE_POINTS = 0x110000
COPY, FALLBACK = 0, 1
VOCAB_SIZE = 4000  # neko.txt has 3127 distinct characters


def neko_lines() -> list[str]:
    return [line for line in NEKO.read_text(encoding="utf-8").splitlines() if line.strip()]


def train(out: Path, **options) -> Path:
    """A smaller model than the stage's, on part of neko.txt: 0.2 s instead of 2.3 s."""
    spm.SentencePieceTrainer.train(sentence_iterator=iter(neko_lines()[:1000]), model_prefix=str(out),
                                   vocab_size=2000, character_coverage=0.98, byte_fallback=True,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, **options)
    return out.with_suffix(".model")


@pytest.fixture(scope="module")
def t5_model(tmp_path_factory) -> Path:
    """A model as the tokenizer stage trains it (nmt_nfkc, SentencePiece's default and T5's)."""
    path = tmp_path_factory.mktemp("sp") / "spiece.model"
    train_sentencepiece(neko_lines(), TokenizerConfig(vocab_size=VOCAB_SIZE), path)
    return path


@pytest.fixture(scope="module", params=["nmt_nfkc", "nfkc_cf"])
def model(request, t5_model, tmp_path_factory) -> Path:
    if request.param == "nmt_nfkc":
        return t5_model
    return train(tmp_path_factory.mktemp("sp") / request.param, normalization_rule_name=request.param)


def encoder_for(path: Path) -> Encoder:
    encoder = Encoder(path)
    assert sp_encode._spm_premap is not None, NOT_BUILT
    assert encoder.premaps
    return encoder


def assert_same_ids(encoder: Encoder, texts: list[bytes]) -> None:
    got = encoder.encode(texts)
    expected = encoder.sp.encode(texts, return_type="numpy")
    assert len(got) == len(expected)
    for text, a, b in zip(texts, got, expected):
        assert np.array_equal(a, b), f"{text!r}: {a.tolist()} != {b.tolist()}"


def utf8(texts: list[str]) -> list[bytes]:
    return [t.encode("utf-8") for t in texts]


def test_extension_is_built():
    assert sp_encode._spm_premap is not None, NOT_BUILT


# --- the table against a Python reading of the charsmap ------------------------------------


def read_charsmap(blob: bytes) -> tuple[dict[str, str], set[str]]:
    """The one-character rules {char: replacement} and the second characters of the longer
    rules, from the darts-clone trie in Python (the layout SentencePiece's normalizer.cc reads)."""
    size = struct.unpack_from("<I", blob)[0]
    units = np.frombuffer(blob, dtype="<u4", count=size // 4, offset=4).tolist()
    pool = blob[4 + size :]

    def offset(unit: int) -> int:
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    def walk(node: int, prefix: bytes, values: dict, ends: list) -> None:
        """Every path below `node` until it has read one whole character."""
        for byte in range(1, 256):
            pos = node ^ byte
            if pos >= len(units) or units[pos] & ((1 << 31) | 0xFF) != byte:
                continue
            key, child = prefix + bytes([byte]), pos ^ offset(units[pos])
            try:
                char = key.decode("utf-8")
            except UnicodeDecodeError:
                walk(child, key, values, ends)
                continue
            if (units[pos] >> 8) & 1:
                values[char] = pool[units[child] & ((1 << 31) - 1) :].split(b"\0", 1)[0].decode("utf-8")
            ends.append((char, child))

    single, firsts = {}, []
    walk(offset(units[0]), b"", single, firsts)
    seconds: set[str] = set()
    for _, node in firsts:
        ends: list = []
        walk(node, b"", {}, ends)
        seconds.update(char for char, _ in ends)
    return single, seconds


def test_the_table_is_the_charsmap(model):
    encoder = encoder_for(model)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    single, seconds = read_charsmap(proto.normalizer_spec.precompiled_charsmap)
    assert seconds  # nmt_nfkc and nfkc_cf both have rules of several characters

    entries = np.frombuffer(encoder.table, dtype="<u4", count=NUM_CODE_POINTS)
    flags = encoder.table[NUM_CODE_POINTS * 4 + 0x10000 // 8 :][:8]
    pool = encoder.table[NUM_CODE_POINTS * 4 + 0x10000 // 8 + 8 :]
    fallback = {chr(c) for c in np.flatnonzero(entries == FALLBACK).tolist()}
    assert fallback == seconds | {"\0"}
    mapped = {}
    for c in np.flatnonzero(entries > FALLBACK).tolist():
        start, length = (int(entries[c]) >> 8) - 1, int(entries[c]) & 0xFF
        mapped[chr(c)] = pool[start : start + length].decode("utf-8")
    assert mapped == {c: v for c, v in single.items() if c not in fallback}
    # the BMP bitmap marks exactly the code points whose entry is not COPY
    bits = np.unpackbits(np.frombuffer(encoder.table, np.uint8, 0x10000 // 8, NUM_CODE_POINTS * 4), bitorder="little")
    assert np.array_equal(bits.astype(bool), entries[:0x10000] != COPY)
    # the flag that lets printable ASCII be skipped 16 bytes at a time: nfkc_cf folds A-Z
    assert flags[0] == (1 if all(entries[0x20:0x7F] == COPY) else 0)
    assert flags[0] == (1 if model.stem == "spiece" else 0)


# --- the same ids as the model --------------------------------------------------------------


def test_every_code_point_in_contexts(model):
    encoder = encoder_for(model)
    premapped = sp_encode._spm_premap.premap(utf8(CODE_POINTS), encoder.table)
    mapped = [c for c, m in zip(CODE_POINTS, premapped) if m is not None]
    left = [c for c, m in zip(CODE_POINTS, premapped) if m is None]
    assert 100 < len(left) < 1000  # the second characters of longer rules, and U+0000
    chunks = [mapped[i : i + 300] for i in range(0, len(mapped), 300)]
    texts = []
    for chunk in chunks:
        texts += ["".join(chunk), "a".join(chunk), " ".join(chunk) + " ", "\n".join(chunk),
                  "あ" + "  ".join(f"x{c}\t{c}y" for c in chunk) + "い", "　".join(c + "ﾃ" for c in chunk)]
    assert_same_ids(encoder, utf8(texts))
    # the characters left to the model, each in a text of its own
    assert_same_ids(encoder, utf8(["あ" + c + "い" for c in left] + [c + c for c in left]))


def test_decomposed_forms_and_voicing_marks(model):
    """Longer rules are built from decomposed forms: NFD and NFKD of every code point, and
    kana followed by every voicing mark (half-width or combining) go through the model."""
    texts = set()
    for c in CODE_POINTS:
        for form in ("NFD", "NFKD"):
            decomposed = unicodedata.normalize(form, c)
            if len(decomposed) > 1:
                texts.update((decomposed, "x" + decomposed + "あ"))
    marks = ["ﾞ", "ﾟ", "\u3099", "\u309a", "゛", "゜"]
    kana = [chr(c) for c in list(range(0x3041, 0x3100)) + list(range(0xFF66, 0xFF9E))]
    texts.update(k + m + "。" for k in kana for m in marks)
    assert_same_ids(encoder_for(model), utf8(sorted(texts)))


def random_text(rng: random.Random) -> bytes:
    alphabet = ("abc XYZ 012.,!?~*", "\t\n\r\x0b\x0c\x1c\x1f\x7f\x00\x01", "\u3000\xa0\u2002\u2028\u200b\ufeff",
                "あいうかきくガギ。、「」ー", "吾輩猫名前無", "ＡＢＣ０１２（）！？：", "ｱｲｳｶﾞｷﾟﾞﾟｰ", "\u0301\u0308\u3099\u309a",
                "①㍿㌔℡ﬁ", "😀𠮷\U000e0100", "\ufffd\ufdfa")
    parts = []
    for _ in range(rng.randrange(0, 40)):
        if rng.random() < 0.05:
            parts.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4))))  # not UTF-8, mostly
        else:
            group = rng.choice(alphabet)
            parts.append("".join(rng.choice(group) for _ in range(rng.randrange(1, 6))).encode("utf-8"))
    return b"".join(parts)


def test_random_text_and_bytes(model):
    rng = random.Random(7)
    texts = [random_text(rng) for _ in range(5000)]
    assert any(t is None for t in sp_encode._spm_premap.premap(texts, encoder_for(model).table))
    assert_same_ids(encoder_for(model), texts)


def test_bytes_that_are_not_utf8_are_copied(t5_model):
    """SentencePiece reads each such byte as U+FFFD with the map or without it."""
    encoder = encoder_for(t5_model)
    texts = [b"\xff", b"a\x80b", b"\xe3\x81", b"\xe3\x81a\n", b"\xed\xa0\x80x", b"\xc0\xaf\t", b"\xf4\x90\x80\x80"]
    assert sp_encode._spm_premap.premap(texts, encoder.table) == [
        b"\xff", b"a\x80b", b"\xe3\x81", b"\xe3\x81a ", b"\xed\xa0\x80x", b"\xc0\xaf ", b"\xf4\x90\x80\x80"]
    assert_same_ids(encoder, texts)


def test_printable_ascii_runs(model):
    """Runs of printable ASCII are skipped 16 bytes at a time where no rule maps them: any other
    character at every position of a block, and past its end."""
    others = utf8(["\t", "\n", "\x7f", "\x00", "\x1f", "é", "Ａ", "ｶﾞ", "e\u0301", "吾", "\u3000", "\ufdfa", "😀"]) + [b"\xff"]
    texts = [pad + c + rest for c in others for n in range(0, 40) for pad in (b"x" * n, b"AbC" * (n // 3))
             for rest in (b"y" * 40, c + b"Z" * 17, b"")]
    assert_same_ids(encoder_for(model), texts)


def test_sample_corpus(t5_model):
    encoder = encoder_for(t5_model)
    paragraphs = utf8([p for p in NEKO.read_text(encoding="utf-8").split("\n\n") if p.strip()])
    premapped = sp_encode._spm_premap.premap(paragraphs, encoder.table)
    assert None not in premapped
    assert all(b"\n" not in t for t in premapped)  # a line break is a space to nmt_nfkc
    assert_same_ids(encoder, paragraphs)


def test_mixed_batches_keep_their_order(t5_model):
    encoder = encoder_for(t5_model)
    texts = utf8(["ｶﾞｷﾞ", "吾輩は猫である。", "e\u0301", "（名前）\nまだ無い", "", "가"] * 3)
    assert_same_ids(encoder, texts)
    assert encoder.encode([]) == []


def test_an_unchanged_text_is_not_copied(t5_model):
    text = "吾輩は猫である。".encode("utf-8")
    assert sp_encode._spm_premap.premap([text], encoder_for(t5_model).table)[0] is text


# --- models it leaves alone, bad arguments --------------------------------------------------


def test_without_the_extension_the_model_encodes(t5_model, monkeypatch):
    """Where no C compiler built the extension, SentencePiece normalises, as it always did."""
    monkeypatch.setattr(sp_encode, "_spm_premap", None)
    encoder = Encoder(t5_model)
    assert not encoder.premaps
    assert_same_ids(encoder, utf8(["（名前）\nまだ無い", "ｶﾞ", ""]))


def test_identity_model_is_encoded_as_it_is(tmp_path):
    encoder = Encoder(train(tmp_path / "identity", normalization_rule_name="identity"))
    assert not encoder.premaps
    assert_same_ids(encoder, utf8(["（名前）\nまだ無い", "ｶﾞ"]))


def test_user_defined_symbols_are_left_to_the_model(tmp_path):
    """SentencePiece does not normalise a user-defined symbol where the text has it: "（株）"
    stays full-width inside it, though "（" alone becomes "(". A per-character map cannot know."""
    encoder = Encoder(train(tmp_path / "user", user_defined_symbols=["（株）"]))
    assert not encoder.premaps
    assert_same_ids(encoder, utf8(["（株）と（名前）"]))


def test_the_identity_model_is_the_model_less_its_charsmap(model):
    """prepare() rewrites the ModelProto at the wire level: the result reads, with protobuf,
    as the model with name "identity" and no charsmap, and nothing else changed."""
    table, identity = sp_encode._spm_premap.prepare(model.read_bytes())
    expected = sentencepiece_model_pb2.ModelProto()
    expected.ParseFromString(model.read_bytes())
    assert table == sp_encode._spm_premap.compile_charsmap(expected.normalizer_spec.precompiled_charsmap)
    expected.normalizer_spec.name = "identity"
    expected.normalizer_spec.ClearField("precompiled_charsmap")
    got = sentencepiece_model_pb2.ModelProto()
    got.ParseFromString(identity)
    assert got == expected


def test_a_model_that_is_not_protobuf_fails_naming_its_file(tmp_path):
    bad = tmp_path / "spiece.model"
    bad.write_bytes(b"\x0a\xff\xff not a model")
    assert sp_encode._spm_premap.prepare(bad.read_bytes()) is None
    with pytest.raises(RuntimeError, match="spiece.model"):
        Encoder(bad)


def test_a_rule_that_ends_inside_a_character_is_refused(t5_model):
    """SentencePiece's builder makes keys of whole characters; a charsmap with a key ending
    inside one (here: the first byte of the full-width forms, EF, made a key) could match
    bytes a table cannot, so it is refused and the model normalises as it always does."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(t5_model.read_bytes())
    blob = bytearray(proto.normalizer_spec.precompiled_charsmap)
    units = np.frombuffer(blob, dtype="<u4", count=struct.unpack_from("<I", blob)[0] // 4, offset=4)
    root = (int(units[0]) >> 10) << ((int(units[0]) & (1 << 9)) >> 6)
    position = root ^ 0xEF
    assert int(units[position]) & 0xFF == 0xEF and not (int(units[position]) >> 8) & 1
    struct.pack_into("<I", blob, 4 + 4 * position, int(units[position]) | (1 << 8))
    with pytest.raises(ValueError, match="not whole UTF-8 characters"):
        sp_encode._spm_premap.compile_charsmap(bytes(blob))
    proto.normalizer_spec.precompiled_charsmap = bytes(blob)
    assert sp_encode._spm_premap.prepare(proto.SerializeToString()) is None


def test_premap_names_a_text_that_is_not_bytes(t5_model):
    with pytest.raises(TypeError, match=r"texts\[1\] is str, not bytes"):
        sp_encode._spm_premap.premap([b"a", "b"], encoder_for(t5_model).table)


def test_compile_refuses_what_is_not_a_charsmap():
    with pytest.raises(ValueError, match="not a SentencePiece precompiled charsmap"):
        sp_encode._spm_premap.compile_charsmap(b"\xff\xff\xff\x7fabcd")
    with pytest.raises(ValueError, match="table is not from compile_charsmap"):
        sp_encode._spm_premap.premap([b"a"], b"short")
