"""Pure logic of the trainer: data order, batch plan, LR schedule, presets, param flattening."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import TrainConfig
from trainer.data import BatchPlan, SampleOrder, TokenWindows
from trainer.metrics import flatten
from trainer.model import ModelConfig, build_model, build_model_config
from trainer.optim import lr_factor


def test_sample_order_is_a_pure_function_of_seed_and_index():
    order = SampleOrder(num_windows=10, seed=3)
    first_epoch = order.windows(np.arange(10))
    assert sorted(first_epoch) == list(range(10))  # a permutation: each window once per epoch
    assert not np.array_equal(first_epoch, order.windows(np.arange(10, 20)))  # reshuffled per epoch
    fresh = SampleOrder(num_windows=10, seed=3)
    assert np.array_equal(fresh.windows(np.array([17, 4, 25])), order.windows(np.array([17, 4, 25])))
    assert not np.array_equal(SampleOrder(10, seed=4).windows(np.arange(10)), first_epoch)


def test_batch_plan_covers_each_step_exactly_once():
    plan = BatchPlan(global_batch_size=32, micro_batch_size=4, world_size=2)
    assert plan.accumulation_steps == 4
    seen = np.concatenate([plan.micro_batch_indices(5, m, r) for m in range(4) for r in range(2)])
    assert sorted(seen) == list(range(5 * 32, 6 * 32))


def test_batch_plan_same_samples_for_any_split_of_the_global_batch():
    a = BatchPlan(32, 4, 2)
    b = BatchPlan(32, 8, 4)
    step_a = {int(i) for m in range(a.accumulation_steps) for r in range(2) for i in a.micro_batch_indices(3, m, r)}
    step_b = {int(i) for m in range(b.accumulation_steps) for r in range(4) for i in b.micro_batch_indices(3, m, r)}
    assert step_a == step_b


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_lr_schedule_warmup_then_decay(decay):
    cfg = TrainConfig(steps=100, warmup_steps=10, lr_decay=decay, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    end = lr_factor(100, cfg)
    assert end == pytest.approx(1.0 if decay == "constant" else 0.1)
    assert lr_factor(55, cfg) <= 1.0


def test_t5_base_preset_has_the_seed_parameter_count():
    with torch.device("meta"):
        model = build_model(ModelConfig(preset="t5-base-ja"), tokenizer_size=32100)
    assert model.config.vocab_size == 32128
    assert model.num_parameters() == 222_903_552  # t5-base-japanese: 222M


def test_tiny_preset_sizes_vocab_from_tokenizer_and_rejects_too_small():
    assert build_model_config(ModelConfig(preset="t5-tiny"), 4100).vocab_size == 4224
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_model_config(ModelConfig(preset="t5-tiny", overrides={"vocab_size": 1000}), 4100)


def test_flatten_params():
    assert flatten({"train": {"lr": 0.001, "betas": [0.9, 0.99]}, "name": "x"}) == {
        "train.lr": "0.001", "train.betas": "[0.9, 0.99]", "name": "x"}


def test_token_windows_read_data_prep_shards(neko_data):
    from data_prep import layout

    windows = TokenWindows(layout.tokens_dir(neko_data))
    assert windows.pack_length == 141
    rows = windows.get(np.array([0, len(windows) - 1]))
    assert rows.shape == (2, 141) and rows.dtype == np.int64
    assert (rows >= 0).all() and (rows < 4100).all()


def test_token_windows_missing_manifest_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `t5ja prep`"):
        TokenWindows(tmp_path)
