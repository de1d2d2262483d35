"""Text normalisation applied to every document before filtering (one job: text in, text out)."""
from __future__ import annotations

import re
import unicodedata
from typing import Callable

import neologdn

from data_prep.config import CleanConfig

# Any whitespace except the line break: spaces, tabs, NBSP, U+3000 that survive the normaliser.
_SPACE_RUN = re.compile(r"[^\S\n]+")


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


def clean_text(text: str) -> str:
    """NFKC, then `clean_whitespace`.

    NFKC folds half-width katakana and full-width ASCII (ｱ→ア, １→1) and turns the
    ideographic paragraph indent U+3000 into a plain space, which the strip then removes.
    """
    return clean_whitespace(unicodedata.normalize("NFKC", text))


def normalize_neologdn_line(line: str) -> str:
    # neologdn only knows ' ' and U+3000: tabs and NBSP become one space first, so that its
    # rule "no space between Japanese characters" sees them too. neologdn is not a full NFKC
    # (it keeps …, ①, ㍻): NFKC afterwards, so the text matches what SentencePiece's nmt_nfkc
    # normaliser feeds the model, and neologd's own choices (－ → ー) are made first.
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


def build_normalizer(cfg: CleanConfig) -> Callable[[str], str]:
    """The text → text function for `cfg.normalize`; all run in C apart from a loop over lines."""
    normalizers: dict[str, Callable[[str], str]] = {
        "neologdn": normalize_neologdn,  # folds ｱ→ア, Ａ１→A1, ーーー→ー, drops ~, spaces between kana/kanji
        "nfkc": clean_text,
        "none": clean_whitespace,
    }
    return normalizers[cfg.normalize]
