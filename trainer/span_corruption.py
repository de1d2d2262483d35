"""T5 span corruption: the pretraining objective of Raffel et al. 2020, §3.1.4.

A raw window of ``expanded_length`` tokens is split into alternating non-noise and
noise spans (noise density 0.15, mean noise span length 3 by default: the paper's
baseline, §3.1.4 and Table 4).  Each noise span is replaced in the encoder input by
one sentinel, and the decoder target lists every sentinel followed by the tokens it
replaced.  ``expanded_length`` is chosen so that the corrupted input is exactly
``input_length`` tokens, so no padding is ever needed.

Adapted from two Apache-2.0 sources (the same licence as this project):
- google-research/text-to-text-transfer-transformer, ``t5/data/preprocessors.py``
  (``random_spans_noise_mask``, ``random_spans_helper``);
- huggingface/transformers, ``examples/flax/language-modeling/run_t5_mlm_flax.py``
  (``compute_input_and_target_lengths``, ``random_spans_noise_mask``,
  ``create_sentinel_ids``, ``filter_input_ids``).
Differences are noted where they occur.  Only numpy runs per sample; torch appears
only when a batch is handed to the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


def get_span_counts(
    length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int, int]:
    """Return (num_noise_tokens, num_nonnoise_tokens, num_noise_spans) for a window.

    Same rounding as the t5 reference: Python's ``round`` and ``np.round`` both round
    half to even, like ``tf.round``.  The clamps avoid windows with no noise or no
    kept token, and a window with no span.
    """
    num_noise_tokens = min(max(int(round(length * noise_density)), 1), length - 1)
    num_noise_spans = max(int(round(num_noise_tokens / mean_noise_span_length)), 1)
    return num_noise_tokens, length - num_noise_tokens, num_noise_spans


def get_corrupted_lengths(
    length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """Return (input_length, target_length) after corrupting a window of ``length``.

    Inputs: kept tokens + one sentinel per span + EOS.
    Targets: noise tokens + one sentinel per span + EOS.
    """
    num_noise, num_nonnoise, num_spans = get_span_counts(
        length, noise_density, mean_noise_span_length
    )
    return num_nonnoise + num_spans + 1, num_noise + num_spans + 1


def compute_input_and_target_lengths(
    inputs_length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """Return (tokens_length, targets_length) for a wanted encoder input length.

    ``tokens_length`` is the largest raw window whose corrupted input fits in
    ``inputs_length``; e.g. (512, 0.15, 3) -> (568, 114).
    Reference: ``compute_input_and_target_lengths`` in run_t5_mlm_flax.py.
    """

    def input_length_of(tokens_length: int) -> int:
        return get_corrupted_lengths(tokens_length, noise_density, mean_noise_span_length)[0]

    tokens_length = inputs_length
    # Not in the reference, which starts at inputs_length and only walks up: with a
    # mean span length of 1 that start already overflows and it returns a window
    # whose corrupted input is too long.  Walking down first changes nothing when
    # the start fits, which is every case the reference handles correctly.
    while tokens_length > 2 and input_length_of(tokens_length) > inputs_length:
        tokens_length -= 1
    while input_length_of(tokens_length + 1) <= inputs_length:
        tokens_length += 1
    _, targets_length = get_corrupted_lengths(
        tokens_length, noise_density, mean_noise_span_length
    )
    # Reference hack, kept as is: at density 0.5 make the targets as long as the
    # inputs, "which is more likely to have been set to a nice round number".
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def _random_segmentation(
    num_items: int, num_segments: int, rng: np.random.Generator
) -> np.ndarray:
    """Split ``num_items`` into ``num_segments`` non-empty runs, uniformly at random.

    Returns the run lengths.  The reference's construction: shuffle the
    ``num_segments - 1`` run boundaries among the ``num_items - 1`` gaps.
    """
    is_boundary = np.arange(num_items - 1) < (num_segments - 1)
    rng.shuffle(is_boundary)
    first_in_segment = np.concatenate(([False], is_boundary))
    segment_id = np.cumsum(first_in_segment)
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(
    length: int,
    noise_density: float,
    mean_noise_span_length: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Return a bool mask of ``length``: True marks noise.

    Exactly ``get_span_counts`` noise tokens in exactly that many noise spans,
    interleaved with as many non-noise spans, starting with non-noise (so the
    window's first token is never noise).
    Reference: ``random_spans_noise_mask`` in t5/data/preprocessors.py.
    """
    if length < 2:
        raise ValueError(f"span corruption needs a window of at least 2 tokens, got {length}")
    num_noise, num_nonnoise, num_spans = get_span_counts(
        length, noise_density, mean_noise_span_length
    )
    if num_spans > num_nonnoise:
        raise ValueError(
            f"{num_spans} noise spans need at least as many kept tokens, "
            f"but a window of {length} keeps only {num_nonnoise}"
        )
    noise_span_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_span_lengths = _random_segmentation(num_nonnoise, num_spans, rng)
    interleaved = np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved)[:-1]
    span_start_indicator = np.zeros(length, dtype=np.int64)
    span_start_indicator[span_starts] = 1
    span_num = np.cumsum(span_start_indicator)
    return span_num % 2 == 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Derive the mask seed of one sample from (run seed, epoch, global sample index).

    The mask then depends only on the sample, not on which rank or step drew it,
    so a resumed run (or one with a different world size) corrupts every sample
    exactly as the original run did.  SeedSequence hashes the whole tuple, so
    nearby tuples give unrelated streams; plain arithmetic such as
    ``seed + index`` would make run 1's sample 0 reuse run 0's sample 1 mask.
    The result is 32-bit, so two samples of a long run may share a seed; they
    still hold different tokens, so that costs nothing.
    """
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class SpanCorruptionConfig(BaseModel):
    """Span-corruption objective of Raffel et al. 2020 §3.1.4."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["span_corruption"] = Field(
        "span_corruption", description="Objective name; selects this objective."
    )
    noise_density: float = Field(
        0.15, gt=0.0, lt=1.0, description="Fraction of window tokens masked (T5: 0.15)."
    )
    mean_noise_span_length: float = Field(
        3.0, ge=1.0, description="Mean length of a masked span in tokens (T5: 3)."
    )
    input_length: int = Field(
        512, ge=8, description="Encoder input length in tokens, final EOS included."
    )

    @property
    def expanded_length(self) -> int:
        """Raw window length in tokens that corrupts to exactly ``input_length``."""
        return self._lengths()[0]

    @property
    def target_length(self) -> int:
        """Decoder target length in tokens, sentinels and final EOS included."""
        return self._lengths()[1]

    def _lengths(self) -> tuple[int, int]:
        return compute_input_and_target_lengths(
            self.input_length, self.noise_density, self.mean_noise_span_length
        )

    @model_validator(mode="after")
    def _check_lengths_reachable(self) -> SpanCorruptionConfig:
        # Some settings have no window that corrupts to exactly input_length (the
        # corrupted length can jump by 2), and the reference's density-0.5 hack can
        # shrink the window below it; catch both here, not mid-run.
        expanded_length, target_length = self._lengths()
        actual = get_corrupted_lengths(
            expanded_length, self.noise_density, self.mean_noise_span_length
        )
        if actual != (self.input_length, target_length):
            raise ValueError(
                f"no window corrupts to exactly input_length={self.input_length} with "
                f"noise_density={self.noise_density}, mean_noise_span_length="
                f"{self.mean_noise_span_length}: a window of {expanded_length} gives "
                f"input/target lengths {actual}; choose another input_length"
            )
        _, num_nonnoise, num_spans = get_span_counts(
            expanded_length, self.noise_density, self.mean_noise_span_length
        )
        if num_spans > num_nonnoise:
            raise ValueError(
                f"noise_density={self.noise_density} leaves {num_nonnoise} kept tokens "
                f"for {num_spans} noise spans; lower noise_density"
            )
        return self


class SpanCorruptionCollator:
    """Turn raw token windows into (input_ids, labels) for a T5 encoder-decoder.

    Sentinels follow T5's order: ``<extra_id_0>`` is the highest tokenizer id
    (``len(tokenizer) - 1``) and ``<extra_id_k>`` is ``first_sentinel_id - k``,
    as in the reference ``create_sentinel_ids``.
    """

    def __init__(
        self,
        cfg: SpanCorruptionConfig,
        eos_id: int,
        first_sentinel_id: int,
        num_sentinels: int = 100,
    ) -> None:
        self.cfg = cfg
        self.eos_id = eos_id
        self.first_sentinel_id = first_sentinel_id
        self.expanded_length = cfg.expanded_length
        self.target_length = cfg.target_length
        _, _, self.num_noise_spans = get_span_counts(
            self.expanded_length, cfg.noise_density, cfg.mean_noise_span_length
        )
        self._check_sentinels(num_sentinels)

    def _check_sentinels(self, num_sentinels: int) -> None:
        if self.num_noise_spans > num_sentinels:
            raise ValueError(
                f"a window of {self.expanded_length} tokens has {self.num_noise_spans} "
                f"noise spans but the tokenizer has only {num_sentinels} sentinels"
            )
        if self.first_sentinel_id - num_sentinels + 1 < 0:
            raise ValueError(
                f"first_sentinel_id={self.first_sentinel_id} cannot head "
                f"{num_sentinels} sentinels counting down"
            )
        lowest_sentinel = self.first_sentinel_id - num_sentinels + 1
        if lowest_sentinel <= self.eos_id <= self.first_sentinel_id:
            raise ValueError(f"eos_id={self.eos_id} lies among the sentinel ids")

    def corrupt(
        self, window: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Corrupt one window of ``expanded_length`` tokens; return (inputs, targets)."""
        window = np.asarray(window, dtype=np.int64)
        if window.shape != (self.expanded_length,):
            raise ValueError(
                f"window has shape {window.shape}, expected ({self.expanded_length},): "
                f"input_length={self.cfg.input_length} needs windows of "
                f"{self.expanded_length} tokens"
            )
        inputs, targets = self._apply_masks(window[None], self._noise_mask(rng)[None])
        return inputs[0], targets[0]

    def __call__(
        self, windows: np.ndarray, seeds: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """Corrupt a batch [B, expanded_length]; row b uses ``default_rng(seeds[b])``."""
        windows = np.asarray(windows, dtype=np.int64)
        if windows.ndim != 2 or windows.shape[1] != self.expanded_length:
            raise ValueError(
                f"windows have shape {windows.shape}, expected (B, {self.expanded_length})"
                f" for input_length={self.cfg.input_length}"
            )
        if len(seeds) != windows.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for {windows.shape[0]} windows")
        masks = np.stack([self._noise_mask(np.random.default_rng(s)) for s in seeds])
        inputs, targets = self._apply_masks(windows, masks)
        import torch  # here, not at the top: the launcher validates this module's config without torch

        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(targets)}

    def _noise_mask(self, rng: np.random.Generator) -> np.ndarray:
        return random_spans_noise_mask(
            self.expanded_length, self.cfg.noise_density, self.cfg.mean_noise_span_length, rng
        )

    def _apply_masks(
        self, windows: np.ndarray, masks: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised ``filter_input_ids``: windows [B, N] int64, masks [B, N] bool.

        Every row has the same counts of noise tokens and spans, so the kept
        positions reshape back into a rectangle.
        """
        batch_size = windows.shape[0]
        span_starts = masks & ~np.pad(masks[:, :-1], ((0, 0), (1, 0)))
        # Consecutive noise tokens share the sentinel of their span's first token.
        sentinels = self.first_sentinel_id - (np.cumsum(span_starts, axis=1) - 1)
        inputs = np.where(span_starts, sentinels, windows)[~masks | span_starts]
        # Targets: before each span's first token, its sentinel.  Interleave a
        # (sentinel, token) pair per position and keep the pairs' live halves.
        pairs = np.stack([sentinels, windows], axis=2).reshape(batch_size, -1)
        keep = np.stack([span_starts, masks], axis=2).reshape(batch_size, -1)
        eos = np.full((batch_size, 1), self.eos_id, dtype=np.int64)
        inputs = np.concatenate([inputs.reshape(batch_size, -1), eos], axis=1)
        targets = np.concatenate([pairs[keep].reshape(batch_size, -1), eos], axis=1)
        assert inputs.shape[1] == self.cfg.input_length, inputs.shape
        assert targets.shape[1] == self.target_length, targets.shape
        return inputs, targets
