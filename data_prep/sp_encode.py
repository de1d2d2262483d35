"""SentencePiece encoding with the model's character normalisation done ahead, from a table.

SentencePiece normalises every text before it segments it: with nmt_nfkc (its default, and
T5's) by a longest-match lookup in a trie of ~225k rules at every character, ~10-15% of its
encode time on the bench corpus. Nearly all of those rules map one character to a fixed
string; every longer rule needs, as its second character, one of a small set (combining marks,
half-width voicing marks, Hangul jamo: 140 in nmt_nfkc). A text with none of those normalises
character by character, which data_prep/_spm_premap.c does from a table compiled from the same
rules; the mapped text then goes to a copy of the model whose normaliser is the identity, and
the ids are the same (tests/test_sp_encode.py checks every code point in several contexts).
Any other text, and every text of a model this does not cover (no charsmap, or user-defined
symbols, which SentencePiece keeps from normalisation where the original text has them), goes
to the model as it is.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import sentencepiece as spm

try:
    from data_prep import _spm_premap
except ImportError:  # no C compiler at install: SentencePiece normalises, as without this module
    _spm_premap = None


class Encoder:
    """`encode` as SentencePieceProcessor.encode(texts, return_type="numpy"), with the same ids.

    Built before the docs workers fork, so they share it. The model itself (`sp`) is loaded
    only for a text that needs it, or when the table does not apply."""

    def __init__(self, model_path: Path):
        self.model_path = Path(model_path)
        self.table: bytes | None = None
        self.identity: spm.SentencePieceProcessor | None = None
        prepared = _spm_premap.prepare(self.model_path.read_bytes()) if _spm_premap is not None else None
        if prepared is not None:
            table, identity_model = prepared
            try:
                self.identity = spm.SentencePieceProcessor(model_proto=identity_model)
                self.table = table
            except RuntimeError:  # SentencePiece refuses the model: loading it by name below says why
                pass
        if self.table is None:
            self._load_model_now()

    def _load_model_now(self) -> None:
        """A model the table does not cover is loaded here, not at the first text: a broken
        one fails before the workers fork, with SentencePiece's message naming the file."""
        _ = self.sp

    @functools.cached_property
    def sp(self) -> spm.SentencePieceProcessor:
        return spm.SentencePieceProcessor(model_file=str(self.model_path))

    @property
    def premaps(self) -> bool:
        """Whether texts are normalised ahead (else SentencePiece does it, as always)."""
        return self.table is not None

    def encode(self, texts: list[bytes], num_threads: int = 1) -> list[np.ndarray]:
        """The ids of each UTF-8 text, as the model's own encode gives them."""
        if self.table is None:
            return self.sp.encode(texts, num_threads=num_threads, return_type="numpy")
        mapped = _spm_premap.premap(texts, self.table)
        if None not in mapped:
            return self.identity.encode(mapped, num_threads=num_threads, return_type="numpy")
        return self._encode_mixed(texts, mapped, num_threads)

    def _encode_mixed(self, texts: list[bytes], mapped: list, num_threads: int) -> list[np.ndarray]:
        """Mapped texts through the identity model, the rest through the model itself, in order."""
        rest = [i for i, text in enumerate(mapped) if text is None]
        ahead = [i for i, text in enumerate(mapped) if text is not None]
        encoded: list = [None] * len(texts)
        for i, ids in zip(ahead, self.identity.encode([mapped[i] for i in ahead], num_threads=num_threads,
                                                      return_type="numpy")):
            encoded[i] = ids
        for i, ids in zip(rest, self.sp.encode([texts[i] for i in rest], num_threads=num_threads,
                                               return_type="numpy")):
            encoded[i] = ids
        return encoded
