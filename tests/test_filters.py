"""Text normalisers (data_prep/clean.py) and document filters (data_prep/filters.py): pure logic, fast."""
from __future__ import annotations

import random
import unicodedata
from collections import Counter
from pathlib import Path

import neologdn
import pyarrow as pa
import pytest

from data_prep import clean
from data_prep.clean import SPACES, build_column_normalizer, build_normalizer, clean_text, clean_whitespace
from data_prep.config import CleanConfig, FilterConfig
from data_prep.filters import (
    JapaneseRatio, MaxChars, MinChars, OscarQualityWarnings, RepeatedLines, apply_filters, build_filters,
    get_japanese_ratio,
)


def normalize(mode: str, text: str) -> str:
    return build_normalizer(CleanConfig(normalize=mode))(text)


# --- normalisers -----------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("ｱｲｳ", "アイウ"),  # half-width katakana
    ("ﾊﾟｿｺﾝ", "パソコン"),  # half-width voiced marks fold into one character
    ("ＡＢＣ１２３", "ABC123"),  # full-width ASCII
    ("ｽｰﾊﾟｰｰｰ", "スーパー"),  # half-width long vowel marks, repeats collapsed
    ("うまーーーい", "うまーい"),
    ("チョコレート〜〜", "チョコレート"),  # tildes removed
    ("アイ ウエ　オ", "アイウエオ"),  # spaces (incl. U+3000) between Japanese characters removed
    ("Hello  World", "Hello World"),  # between Latin words one space stays
])
def test_neologdn_folds(raw, expected):
    assert normalize("neologdn", raw) == expected


def test_neologdn_keeps_line_structure():
    raw = "　吾輩は 猫である。\n\n\n名前は　まだ無い。 \n  \t \nｶﾀｶﾅ\tと\tﾀﾌﾞ"
    assert normalize("neologdn", raw) == "吾輩は猫である。\n名前はまだ無い。\nカタカナとタブ"


def test_neologdn_mode_treats_tabs_and_nbsp_as_spaces():
    # neologdn alone keeps tabs and NBSP, even between Japanese characters.
    assert normalize("neologdn", "a\u00a0\u00a0b\u2003c") == "a b c"
    assert normalize("neologdn", "猫\u00a0と\t犬") == "猫と犬"


def test_nfkc_mode_is_clean_text():
    raw = "　ｱｲｳ  ＡＢＣ\n\n ①ー ー \n"
    assert normalize("nfkc", raw) == clean_text(raw) == "アイウ ABC\n1ー ー"


def test_none_mode_only_cleans_whitespace():
    assert normalize("none", "  ｱｲｳ \t ＡＢＣ \n\n\u3000x\n") == "ｱｲｳ ＡＢＣ\nx"


# --- the column normalisers the docs workers run: the same strings as the per-text ones ------

# Every character str.isspace() knows (what str.split() splits on), and a few that are not.
ALL_SPACES = [chr(c) for c in range(0x110000) if chr(c).isspace()]
EDGE_TEXTS = ["", " ", "\n", "\n\n", " \n \n", "a", " a ", "a  b", "a\tb", "a\u3000\u3000b", "a\xa0b", "a \u2003 b",
              "a\r\nb", "a \n\n b", "\u3000吾輩は猫である。\n\n 名前は　まだ無い。 \n", "x\x85y\u2028z", "a\x1c\x1fb"]


def test_spaces_are_exactly_python_whitespace_but_newline():
    assert sorted(SPACES) == sorted(c for c in ALL_SPACES if c != "\n")


def random_texts(seed: int, count: int) -> list[str]:
    """Short texts drawn mostly from whitespace, where the clean-up has the most to get wrong."""
    rng = random.Random(seed)
    alphabet = ALL_SPACES + ["\n"] * 8 + list("ab猫ｱＡ①") + [" "] * 8
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16))) for _ in range(count)]


NEKO = Path(__file__).resolve().parents[1] / "data_prep" / "samples" / "neko.txt"


def neologdn_in_full(line: str) -> str:
    """normalize_neologdn_line without its shortcuts: neologdn on every line."""
    return unicodedata.normalize("NFKC", neologdn.normalize(clean._SPACE_RUN.sub(" ", line)))


def test_neologdn_returns_as_it_is_every_line_the_shortcut_skips():
    """Every code point, alone and beside the characters neologdn's rules look at (kana whose
    sound marks combine, "-", "ー", "*", Latin letters, kanji): wherever _NEOLOGDN_ACTS finds
    nothing, neologdn changes nothing. (~1.1M code points x 5 contexts, a few seconds.)"""
    changed = []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        for line in (c, "あ" + c + "あ", "a" + c + "a", c + c, "カ" + c + "は-ー*漢"):
            if not clean._NEOLOGDN_ACTS.search(line) and neologdn.normalize(line) != line:
                changed.append(line)
    assert changed == []


def random_line(rng: random.Random, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 24)))


def test_neologdn_shortcuts_give_what_neologdn_gives():
    """Random lines, ASCII (where the shortcut keeps neologdn off unless "~" or "*" is there)
    and mixed (kana, kanji, full- and half-width forms, marks, spaces of every kind, and any
    other code point but the surrogates, which the readers never let through): normalize_neologdn_line
    equals neologdn run on every line."""
    rng = random.Random(5)
    ascii_alphabet = "".join(chr(c) for c in range(128) if c != 10) + " " * 20 + "\t" * 3 + "ab" * 10  # a line: no "\n"
    mixed = (clean._NEOLOGDN_FOLDED + clean._NEOLOGDN_MARKS + SPACES + "ああカハは漢字ーーー-- **" + "abc1" * 5
             + "".join(chr(cp) for cp in rng.sample(range(0x80, 0x30000), 300) if not 0xD800 <= cp <= 0xDFFF))
    plain = "".join(c for c in mixed if not clean._NEOLOGDN_ACTS.search(c))  # what the shortcut lets by
    lines = [random_line(rng, alphabet) for alphabet in (ascii_alphabet, mixed, plain) for _ in range(20000)]
    lines += NEKO.read_text(encoding="utf-8").split("\n")
    assert sum(clean._NEOLOGDN_ACTS.search(line) is None for line in lines) > 20000  # the shortcut is taken
    assert [line for line in lines if clean.normalize_neologdn_line(line) != neologdn_in_full(line)] == []


@pytest.mark.parametrize("mode", ["none", "nfkc", "neologdn"])
def test_column_normalizer_matches_per_text(mode):
    per_text = build_normalizer(CleanConfig(normalize=mode))
    per_column = build_column_normalizer(CleanConfig(normalize=mode))
    texts = EDGE_TEXTS + random_texts(seed=0, count=3000)
    assert per_column(pa.array(texts, pa.string())).to_pylist() == [per_text(t) for t in texts]


def test_column_clean_up_of_a_slice_and_of_clean_texts():
    texts = EDGE_TEXTS + random_texts(seed=1, count=200)
    column = pa.array(texts, pa.string()).slice(5, 150)  # an array with an offset, as batches can be
    expected = [clean_whitespace(t) for t in texts[5:155]]
    assert build_column_normalizer(CleanConfig(normalize="none"))(column).to_pylist() == expected
    cleaned = pa.array(expected, pa.string())  # nothing left to collapse: the rewrite is skipped
    assert build_column_normalizer(CleanConfig(normalize="none"))(cleaned).to_pylist() == expected


# --- filters ---------------------------------------------------------------------------


def test_min_chars_boundary_and_empty():
    f = MinChars(3)
    assert (f.keep("abc", {}), f.keep("ab", {})) == (True, False)
    assert not MinChars(0).keep("", {})  # an empty document is never kept
    assert MinChars(0).keep("a", {})
    assert f.reason == "too_short"


def test_max_chars_boundary():
    f = MaxChars(3)
    assert (f.keep("abc", {}), f.keep("abcd", {})) == (True, False)
    assert f.reason == "too_long"


def test_japanese_ratio_counts_kana_kanji_and_marks():
    assert get_japanese_ratio("ひらカタ漢字々〆ヶー") == 1.0
    assert get_japanese_ratio("猫 cat\n犬 dog") == pytest.approx(2 / 8)  # whitespace not counted
    assert get_japanese_ratio("・。、「」") == 0.0  # punctuation is not kana
    assert get_japanese_ratio(" \n ") == 0.0


def test_japanese_ratio_boundary():
    f = JapaneseRatio(0.5)
    assert f.keep("猫猫ab", {}) and not f.keep("猫abc", {})
    assert f.reason == "not_japanese"


def test_repeated_lines_boundary():
    f = RepeatedLines(0.25)
    # 1 of 4 lines repeats an earlier one: exactly at the bound, kept.
    assert f.keep("menu\n本文一\nmenu\n本文二", {})
    # 2 of 4 lines repeat (the first copy is not counted).
    assert not f.keep("menu\nmenu\nmenu\n本文", {})
    assert RepeatedLines(0.0).keep("a\nb\nc", {})
    assert f.reason == "boilerplate"


def test_oscar_quality_warnings():
    f = OscarQualityWarnings({"tiny", "noisy"})
    assert f.keep("t", {}) and f.keep("t", {"quality_warnings": None}) and f.keep("t", {"quality_warnings": ["header"]})
    assert not f.keep("t", {"quality_warnings": ["header", "noisy"]})
    assert f.reason == "quality_warning"


def test_build_filters_default_is_min_chars_only():
    assert [type(f) for f in build_filters(FilterConfig())] == [MinChars]


def test_build_filters_all_enabled_cheapest_first():
    cfg = FilterConfig(
        min_chars=5, max_chars=100, min_japanese_ratio=0.5, max_repeated_line_ratio=0.3, oscar_drop_warnings=["tiny"]
    )
    filters = build_filters(cfg)
    assert [type(f) for f in filters] == [MinChars, MaxChars, OscarQualityWarnings, RepeatedLines, JapaneseRatio]
    assert [f.reason for f in filters] == ["too_short", "too_long", "quality_warning", "boilerplate", "not_japanese"]


def test_first_rejecting_filter_is_the_reason():
    filters = build_filters(FilterConfig(min_chars=5, min_japanese_ratio=0.5))
    reasons = [next((f.reason for f in filters if not f.keep(text, {})), None) for text in ("abc", "abcdef", "吾輩は猫")]
    assert reasons == ["too_short", "not_japanese", "too_short"]


def test_apply_filters_matches_keep_one_by_one():
    filters = build_filters(FilterConfig(min_chars=3, max_chars=12, min_japanese_ratio=0.5, max_repeated_line_ratio=0.3,
                                         oscar_drop_warnings=["tiny"]))
    texts = ["ab", "吾輩は猫である", "abcdef", "x" * 20, "猫\n猫\n猫\n猫", "吾輩は猫", "", "名前はまだ無い"]
    metas = [{}, {}, {}, {}, {}, {"quality_warnings": ["tiny"]}, {}, {"quality_warnings": ["header"]}]
    keep, dropped = apply_filters(filters, pa.array(texts, pa.string()), metas)
    first_reasons = [next((f.reason for f in filters if not f.keep(t, m)), None) for t, m in zip(texts, metas)]
    assert keep.tolist() == [reason is None for reason in first_reasons]
    assert dropped == Counter(reason for reason in first_reasons if reason)
    assert set(dropped) == {"too_short", "too_long", "quality_warning", "boilerplate", "not_japanese"}
