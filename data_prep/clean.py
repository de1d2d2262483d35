"""Text normalisation applied to every document before filtering (one job: text in, text out)."""
from __future__ import annotations

import re
import unicodedata
from typing import Callable

import neologdn
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.config import CleanConfig

# The C one-pass version of clean_whitespace_column, built by `make setup` (setup.py); it is
# optional there (no compiler: no extension), and the Arrow-kernel version stands in.
try:
    from data_prep import _whitespace
except ImportError:
    _whitespace = None

# Any whitespace except the line break: spaces, tabs, NBSP, U+3000 that survive the normaliser.
_SPACE_RUN = re.compile(r"[^\S\n]+")

# The same characters spelled out for Arrow's kernels (RE2 knows only ASCII whitespace): what
# str.isspace() and so str.split() take for whitespace, less "\n". tests/test_filters.py checks
# the list against every code point; data_prep/_whitespace.c spells it in UTF-8 bytes, and
# tests/test_clean_native.py checks that one against every code point.
SPACES = ("\t\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
          + "\u2028\u2029\u202f\u205f\u3000")


def _re2_class(chars: str) -> str:
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in chars) + "]"


# A run of spaces that is not already a single " ": the only runs the collapse has to rewrite
# (rewriting every run costs Arrow a copy per match, and most runs are one plain space).
_RUN_TO_COLLAPSE = "(?:{odd}|{any}{{2,}}){any}*".format(odd=_re2_class(SPACES.replace(" ", "")), any=_re2_class(SPACES))


def clean_whitespace(text: str, normalize_line: Callable[[str], str] | None = None) -> str:
    """Collapse runs of spaces, strip each line, drop empty lines; newlines between lines are kept.

    Indentation (often the ideographic space U+3000 in Japanese prose) carries no content and
    would only waste tokens. `normalize_line`, if given, is applied to each line first.
    """
    lines = text.split("\n")
    if normalize_line is not None:
        lines = map(normalize_line, lines)
    # str.split() with no argument splits on exactly the whitespace `\s` matches (Unicode
    # aware) and drops the ends: the same result as a regex collapse + strip, twice as fast.
    return "\n".join(filter(None, (" ".join(line.split()) for line in lines)))


def clean_whitespace_column(texts: pa.Array) -> pa.StringArray:
    """`clean_whitespace` of every string of an Arrow string (or large_string) column; a null
    becomes "". Same type out.

    In C (data_prep/_whitespace.c), one pass over the UTF-8 bytes with no Python step per line
    (Japanese web and documentation text has a line every ~30 characters); ~5x less CPU than
    the Arrow kernels (`_clean_whitespace_column_arrow`), which stand in without the extension.
    """
    large = pa.types.is_large_string(texts.type)
    if _whitespace is None or not isinstance(texts, pa.Array) or not (large or pa.types.is_string(texts.type)):
        return _clean_whitespace_column_arrow(texts)
    if texts.null_count:
        texts = pc.fill_null(texts, "")  # what the Arrow version makes of a null
    n = len(texts)
    if n == 0:
        return pa.array([], texts.type)
    width = 8 if large else 4
    _, offsets, data = texts.buffers()
    # The array's own n + 1 offsets (a slice shares its parent's buffers); the C side reads
    # only the bytes they span, and writes no more than that.
    offsets = offsets.slice(texts.offset * width, (n + 1) * width)
    first, last = np.frombuffer(offsets, np.int64 if large else np.int32)[[0, -1]].tolist()
    # Output buffers from Arrow's pool, which reuses its pages: a fresh allocation per batch
    # costs page faults, ~1/3 more CPU than the clean-up itself.
    out_data, out_offsets = pa.allocate_buffer(max(last - first, 0)), pa.allocate_buffer((n + 1) * width)
    written = _whitespace.clean(b"" if data is None else data, offsets, width, out_data, out_offsets)
    return pa.Array.from_buffers(texts.type, n, [None, out_offsets, out_data.slice(0, written)])


def _clean_whitespace_column_arrow(texts: pa.Array) -> pa.StringArray:
    """`clean_whitespace_column` in Arrow's C++ kernels: collapse runs of spaces, split into
    lines, strip each line, drop the empty ones, join. About 3x faster than the per-line loop."""
    if pa.types.is_large_string(texts.type):  # binary_join has no large_string kernel
        return _clean_whitespace_column_arrow(texts.cast(pa.string())).cast(pa.large_string())
    lines = pc.split_pattern(_collapse_runs(texts), "\n")
    stripped = pc.utf8_trim(lines.flatten(), SPACES)
    nonempty = pc.greater(pc.binary_length(stripped), 0)
    kept_before = np.cumsum(nonempty.to_numpy(zero_copy_only=False), dtype=np.int64)
    kept_before = np.concatenate([np.zeros(1, dtype=np.int64), kept_before])
    offsets = kept_before[lines.offsets.to_numpy()].astype(np.int32)  # lines of each text, empty ones dropped
    offsets_array = pa.Array.from_buffers(pa.int32(), len(offsets), [None, pa.py_buffer(offsets)])
    return pc.binary_join(pa.ListArray.from_arrays(offsets_array, stripped.filter(nonempty)), "\n")


def _collapse_runs(texts: pa.Array) -> pa.Array:
    """Each run of spaces that is not a single " " becomes one " "; rewrites only the texts that
    have one (finding them is ~2x cheaper than the rewrite, which copies every text)."""
    needed = pc.match_substring_regex(texts, _RUN_TO_COLLAPSE)
    if not pc.any(needed).as_py():
        return texts
    collapsed = pc.replace_substring_regex(texts.filter(needed), _RUN_TO_COLLAPSE, " ")
    return pc.replace_with_mask(texts, needed, collapsed)


def clean_text(text: str) -> str:
    """NFKC, then `clean_whitespace`.

    NFKC folds half-width katakana and full-width ASCII (ｱ→ア, １→1) and turns the
    ideographic paragraph indent U+3000 into a plain space, which the strip then removes.
    """
    return clean_whitespace(unicodedata.normalize("NFKC", text))


# What neologdn.normalize acts on (neologdn 0.5's tables): the full-width ASCII, digits and
# quotes it folds to ASCII, half-width kana and their sound marks, hyphens, long-vowel marks
# other than "ー", tildes, "*" (it drops a space after one) and U+FEFF (it drops one at an end);
# spaces, around which its space rules look at the neighbours; and "ーー", which it shortens. A
# line with none of these it returns as it is: tests/test_filters.py checks every code point
# alone and in context (it found “ and U+FEFF, which neologdn's source tables do not list), and
# random lines against neologdn itself.
_NEOLOGDN_FOLDED = ("ａｂｃｄｅｆｇｈｉｊｋｌｍｎｏｐｑｒｓｔｕｖｗｘｙｚＡＢＣＤＥＦＧＨＩＪＫＬＭＮＯＰＱＲＳＴＵＶＷＸＹＺ"
                    "！“”＃＄％＆’（）＊＋，−．／：；＜＝＞？＠［¥］＾＿‘｛｜｝０１２３４５６７８９"
                    "ｱｲｳｴｵｶｷｸｹｺｻｼｽｾｿﾀﾁﾂﾃﾄﾅﾆﾇﾈﾉﾊﾋﾌﾍﾎﾏﾐﾑﾒﾓﾔﾕﾖﾗﾘﾙﾚﾛﾜｦﾝｧｨｩｪｫｯｬｭｮ｡､･゛゜｢｣ﾞﾟ")
_NEOLOGDN_MARKS = "˗֊‐‑‒–⁃⁻₋−" + "﹣－ｰ—―─━" + "~∼∾〜〰～" + "*\ufeff"  # hyphens, long-vowel marks, tildes
_NEOLOGDN_ACTS = re.compile("[" + re.escape(_NEOLOGDN_FOLDED + _NEOLOGDN_MARKS) + r"\s]|ーー")


def normalize_neologdn_line(line: str) -> str:
    # neologdn only knows ' ' and U+3000: tabs and NBSP become one space first, so that its
    # rule "no space between Japanese characters" sees them too. neologdn is not a full NFKC
    # (it keeps …, ①, ㍻): NFKC afterwards, so the text matches what SentencePiece's nmt_nfkc
    # normaliser feeds the model, and neologd's own choices (－ → ー) are made first.
    # neologdn is most of the default cleaning's CPU (~0.35 µs a character), so it is skipped
    # where it would return the line as it is: in ASCII it only drops "~", the ends' spaces and
    # repeated spaces, and a space after "*" (NFKC changes no ASCII).
    if line.isascii():
        if "~" not in line and "*" not in line:
            return " ".join(line.split())
    elif not _NEOLOGDN_ACTS.search(line):
        return unicodedata.normalize("NFKC", line)
    return unicodedata.normalize("NFKC", neologdn.normalize(_SPACE_RUN.sub(" ", line)))


def normalize_neologdn(text: str) -> str:
    """neologdn then NFKC per line (after collapsing its whitespace), then `clean_whitespace`.

    Per line because neologdn normalises one string as one sentence (it was written for
    mecab-neologd dictionary entries): it strips only the ends of the whole string and its
    space and repeat rules look at neighbouring characters, treating '\\n' as an ordinary
    character. Given one line at a time, every line is normalised exactly as neologd would,
    and no rule can delete or merge a line break: the paragraph structure survives for the
    repeated-line filter and for training.
    """
    return clean_whitespace(text, normalize_neologdn_line)


def clean_text_column(texts: pa.Array) -> pa.StringArray:
    """`clean_text` of every string of an Arrow string column."""
    return clean_whitespace_column(pa.array([unicodedata.normalize("NFKC", t) for t in texts.to_pylist()], pa.string()))


def build_normalizer(cfg: CleanConfig) -> Callable[[str], str]:
    """The text → text function for `cfg.normalize`; all run in C apart from a loop over lines."""
    normalizers: dict[str, Callable[[str], str]] = {
        "neologdn": normalize_neologdn,  # folds ｱ→ア, Ａ１→A1, ーーー→ー, drops ~, spaces between kana/kanji
        "nfkc": clean_text,
        "none": clean_whitespace,
    }
    return normalizers[cfg.normalize]


def build_column_normalizer(cfg: CleanConfig) -> Callable[[pa.Array], pa.StringArray]:
    """`build_normalizer`'s function applied to every string of an Arrow column: the same
    strings. Whitespace clean-up runs on the whole column; neologdn, which is per line and
    ~5x slower than tokenizing, stays a loop over the documents."""
    if cfg.normalize == "none":
        return clean_whitespace_column
    if cfg.normalize == "nfkc":
        return clean_text_column
    normalize = build_normalizer(cfg)
    return lambda texts: pa.array([normalize(text) for text in texts.to_pylist()], pa.string())
