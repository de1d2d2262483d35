"""Pure-logic tests of T5 span corruption (trainer/span_corruption.py)."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch

from trainer.span_corruption import (
    SpanCorruptionCollator,
    SpanCorruptionConfig,
    compute_input_and_target_lengths,
    get_span_counts,
    random_spans_noise_mask,
    sample_seed,
)

VOCAB_SIZE = 32100  # t5-base: 32000 pieces + 100 <extra_id_*>
FIRST_SENTINEL = VOCAB_SIZE - 1
EOS_ID = 1


def build_collator(input_length: int = 512, **cfg: float) -> SpanCorruptionCollator:
    config = SpanCorruptionConfig(input_length=input_length, **cfg)
    return SpanCorruptionCollator(config, eos_id=EOS_ID, first_sentinel_id=FIRST_SENTINEL)


def random_window(length: int, rng: np.random.Generator) -> np.ndarray:
    # Ordinary pieces only: ids 2..31999, so never EOS nor a sentinel.
    return rng.integers(2, 32000, size=length, dtype=np.int64)


def is_sentinel(ids: np.ndarray) -> np.ndarray:
    return ids > FIRST_SENTINEL - 100


def reconstruct(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Put each target span back in place of the sentinel that names it."""
    assert inputs[-1] == EOS_ID and targets[-1] == EOS_ID
    spans: dict[int, list[int]] = {}
    current = None
    for token in targets[:-1].tolist():
        if token > FIRST_SENTINEL - 100:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    out: list[int] = []
    for token in inputs[:-1].tolist():
        out.extend(spans.pop(token) if token > FIRST_SENTINEL - 100 else [token])
    assert not spans, "every target span must be used once"
    return np.array(out, dtype=np.int64)


def test_reference_lengths_for_t5_baseline():
    assert compute_input_and_target_lengths(512, 0.15, 3.0) == (568, 114)
    cfg = SpanCorruptionConfig()
    assert (cfg.expanded_length, cfg.target_length) == (568, 114)


@pytest.mark.parametrize("input_length", [8, 64, 128, 256, 512, 1024])
def test_expanded_window_corrupts_to_exact_lengths(input_length):
    collator = build_collator(input_length)
    rng = np.random.default_rng(0)
    window = random_window(collator.expanded_length, rng)
    inputs, targets = collator.corrupt(window, rng)
    assert inputs.shape == (input_length,)
    assert targets.shape == (collator.target_length,)
    # Largest such window: one more token would overflow input_length.
    tokens_length, _ = compute_input_and_target_lengths(input_length, 0.15, 3.0)
    noise, nonnoise, spans = get_span_counts(tokens_length + 1, 0.15, 3.0)
    assert nonnoise + spans + 1 > input_length


def test_mean_span_length_one_still_fits():
    # The reference overflows here; every token of noise is its own span.
    collator = build_collator(128, mean_noise_span_length=1.0)
    rng = np.random.default_rng(0)
    inputs, _ = collator.corrupt(random_window(collator.expanded_length, rng), rng)
    assert inputs.shape == (128,)


def test_noise_mask_counts_are_exact():
    length = 568
    num_noise, _, num_spans = get_span_counts(length, 0.15, 3.0)
    assert (num_noise, num_spans) == (round(568 * 0.15), round(85 / 3))
    for seed in range(50):
        mask = random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(seed))
        assert mask.dtype == bool and mask.shape == (length,)
        assert mask.sum() == num_noise
        assert not mask[0], "spans interleave starting with non-noise"
        span_starts = mask & ~np.concatenate(([False], mask[:-1]))
        assert span_starts.sum() == num_spans


def test_corrupted_share_averages_noise_density():
    collator = build_collator(512)
    rng = np.random.default_rng(1)
    shares, span_lengths = [], []
    for seed in range(200):
        window = random_window(collator.expanded_length, rng)
        inputs, targets = collator.corrupt(window, np.random.default_rng(seed))
        num_noise = len(targets) - 1 - is_sentinel(targets).sum()
        shares.append(num_noise / len(window))
        span_lengths.append(num_noise / is_sentinel(targets).sum())
    assert abs(np.mean(shares) - 0.15) < 0.01
    assert abs(np.mean(span_lengths) - 3.0) < 0.1


def test_sentinels_count_down_from_highest_id_in_both_sequences():
    collator = build_collator(512)
    rng = np.random.default_rng(2)
    inputs, targets = collator.corrupt(random_window(568, rng), rng)
    num_spans = collator.num_noise_spans
    expected = np.arange(FIRST_SENTINEL, FIRST_SENTINEL - num_spans, -1)
    np.testing.assert_array_equal(inputs[is_sentinel(inputs)], expected)
    np.testing.assert_array_equal(targets[is_sentinel(targets)], expected)
    assert expected[:2].tolist() == [32099, 32098]
    assert targets[0] == FIRST_SENTINEL, "targets open with <extra_id_0>"
    assert inputs[-1] == EOS_ID and targets[-1] == EOS_ID
    assert not is_sentinel(inputs[:1]).any(), "the first token is never noise"


def test_round_trip_restores_window():
    collator = build_collator(256)
    rng = np.random.default_rng(3)
    for seed in range(20):
        window = random_window(collator.expanded_length, rng)
        inputs, targets = collator.corrupt(window, np.random.default_rng(seed))
        np.testing.assert_array_equal(reconstruct(inputs, targets), window)
        mask = random_spans_noise_mask(
            collator.expanded_length, 0.15, 3.0, np.random.default_rng(seed)
        )
        kept = inputs[:-1][~is_sentinel(inputs[:-1])]
        np.testing.assert_array_equal(kept, window[~mask])


def test_batch_rows_match_single_corruption():
    collator = build_collator(128)
    rng = np.random.default_rng(4)
    windows = np.stack([random_window(collator.expanded_length, rng) for _ in range(8)])
    seeds = [sample_seed(7, 0, i) for i in range(8)]
    batch = collator(windows.astype(np.uint16), seeds)
    for b, seed in enumerate(seeds):
        inputs, targets = collator.corrupt(windows[b], np.random.default_rng(seed))
        np.testing.assert_array_equal(batch["input_ids"][b].numpy(), inputs)
        np.testing.assert_array_equal(batch["labels"][b].numpy(), targets)


def test_call_shapes_dtype_and_determinism():
    collator = build_collator(512)
    rng = np.random.default_rng(5)
    windows = np.stack([random_window(568, rng) for _ in range(16)])
    seeds = [sample_seed(1234, 2, 1000 + i) for i in range(16)]
    first, again = collator(windows, seeds), collator(windows, seeds)
    assert first["input_ids"].shape == (16, 512) and first["labels"].shape == (16, 114)
    assert first["input_ids"].dtype == torch.int64 and first["labels"].dtype == torch.int64
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert torch.equal(first["labels"], again["labels"])
    other = collator(windows, [sample_seed(1234, 3, 1000 + i) for i in range(16)])
    assert not torch.equal(first["input_ids"], other["input_ids"])
    # Identical windows under distinct seeds still get distinct masks.
    same = collator(np.repeat(windows[:1], 16, axis=0), seeds)
    assert len({tuple(row.tolist()) for row in same["input_ids"]}) == 16


def test_sample_seed_is_a_pure_function_of_its_tuple():
    assert sample_seed(0, 0, 5) == sample_seed(0, 0, 5)
    assert isinstance(sample_seed(0, 0, 5), int)
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 3 * 3 * 50
    assert sample_seed(1, 0, 0) != sample_seed(0, 0, 1)


def test_wrong_window_length_names_both_lengths():
    collator = build_collator(512)
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError, match=r"\(512,\).*568"):
        collator.corrupt(random_window(512, rng), rng)
    with pytest.raises(ValueError, match="568"):
        collator(np.zeros((2, 567), dtype=np.int64), [0, 1])
    with pytest.raises(ValueError, match="seeds"):
        collator(np.zeros((2, 568), dtype=np.int64), [0])


def test_too_few_sentinels_rejected():
    cfg = SpanCorruptionConfig(input_length=512)  # 28 spans per window
    SpanCorruptionCollator(cfg, EOS_ID, FIRST_SENTINEL, num_sentinels=28)
    with pytest.raises(ValueError, match="28 noise spans.*27 sentinels"):
        SpanCorruptionCollator(cfg, EOS_ID, FIRST_SENTINEL, num_sentinels=27)
    with pytest.raises(ValueError, match="eos_id"):
        SpanCorruptionCollator(cfg, FIRST_SENTINEL - 3, FIRST_SENTINEL)


@pytest.mark.parametrize(
    "fields",
    [
        {"noise_density": 0.0},
        {"noise_density": 1.0},
        {"mean_noise_span_length": 0.5},
        {"input_length": 7},
        {"unknown_key": 1},
        {"name": "prefix_lm"},
        # The reference's density-0.5 hack overshoots: no exact window exists.
        {"noise_density": 0.5, "input_length": 11},
    ],
)
def test_config_rejects_bad_settings(fields):
    with pytest.raises(pydantic.ValidationError):
        SpanCorruptionConfig(**fields)


def test_config_fields_are_documented():
    for name, field in SpanCorruptionConfig.model_fields.items():
        assert field.description, name
