"""Text normalisation and document filters, one job each (datatrove style `keep(text) -> bool`)."""
from __future__ import annotations

import hashlib
import re
import unicodedata

_SPACE_RUN = re.compile(r"[ \t]+")


def clean_text(text: str) -> str:
    """NFKC, collapse runs of spaces, strip each line, drop empty lines.

    NFKC folds half-width katakana and full-width ASCII (ｱ→ア, １→1) and turns the
    ideographic paragraph indent U+3000 into a plain space, which the strip then removes:
    indentation carries no content and would only waste tokens.
    """
    text = unicodedata.normalize("NFKC", text)
    lines = (_SPACE_RUN.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


class MinChars:
    """Drops documents shorter than `min_chars` characters (after cleaning)."""

    reason = "too_short"

    def __init__(self, min_chars: int):
        self.min_chars = min_chars

    def keep(self, text: str) -> bool:
        return len(text) >= max(self.min_chars, 1)  # an empty document is never kept


class ExactDedup:
    """Drops exact duplicates of an earlier document in this run.

    Keeps 16-byte blake2b digests only, about 100 bytes of Python set per document
    (~1 GB per 10M documents); keeping the texts themselves would not fit.
    """

    reason = "duplicate"

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def keep(self, text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in self.seen:
            return False
        self.seen.add(digest)
        return True


def build_filters(min_chars: int) -> list[MinChars | ExactDedup]:
    # Order matters: a short duplicate counts as too_short, and never enters the hash set.
    return [MinChars(min_chars), ExactDedup()]
