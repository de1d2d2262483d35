"""Pure logic of the trainer: data order, batch plan, LR schedule, presets, param flattening,
the non-finite-loss policy, fault-injection hooks, the restart store prefix."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainer import faults
from trainer.checkpoint import TrainState
from trainer.config import TrainConfig
from trainer.data import BatchPlan, SampleOrder, TokenWindows
from trainer.distributed import get_store_prefix
from trainer.metrics import flatten
from trainer.model import ModelConfig, build_model, build_model_config
from trainer.nonfinite import get_stop_reason
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
    assert lr_factor(0, cfg, 100) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 100) == pytest.approx(1.0)
    end = lr_factor(100, cfg, 100)
    assert end == pytest.approx(1.0 if decay == "constant" else 0.1)
    assert lr_factor(55, cfg, 100) <= 1.0


def test_t5_base_preset_has_the_seed_parameter_count():
    with torch.device("meta"):
        model = build_model(ModelConfig(preset="t5-base-ja"), tokenizer_size=32100)
    assert model.config.vocab_size == 32128
    assert model.num_parameters() == 222_903_552  # t5-base-japanese: 222M


@pytest.mark.parametrize("preset, embedding, rest", [("gemma-2b", 524_550_144, 1_981_884_416),
                                                     ("gemma-7b", 786_825_216, 7_751_248_896)])
def test_gemma_presets_have_the_seed_parameter_counts(preset, embedding, rest):
    with torch.device("meta"):
        model = build_model(ModelConfig(preset=preset), tokenizer_size=256000)
    num_embedding = model.get_input_embeddings().weight.numel()
    assert (num_embedding, model.num_parameters() - num_embedding) == (embedding, rest)


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


def test_token_windows_are_pyarrows_views_without_pandas(neko_data):
    """The shards are read as pyarrow's zero-copy to_numpy would, without the pandas import
    that its conversion does (~1 s per rank start)."""
    import pyarrow as pa

    from data_prep import layout
    from trainer.data import _numpy_view

    windows = TokenWindows(layout.tokens_dir(neko_data))
    shard = windows.manifest["shards"][0]["file"]
    table = pa.ipc.open_stream(pa.memory_map(str(layout.tokens_dir(neko_data) / shard))).read_all()
    expected = table.column("input_ids").combine_chunks().values.to_numpy(zero_copy_only=True)
    view = windows._shards[0]
    assert view.dtype == expected.dtype and np.array_equal(view.ravel(), expected) and not view.flags.writeable
    for values in (pa.array(np.arange(50), pa.uint16()), pa.array(np.arange(50), pa.int64()).slice(7, 20)):
        assert np.array_equal(_numpy_view(values), values.to_numpy(zero_copy_only=True))
        assert _numpy_view(values).dtype == values.to_numpy(zero_copy_only=True).dtype
    with pytest.raises(pa.ArrowInvalid, match="zero_copy_only"):
        _numpy_view(pa.array([1, None], pa.int32()))
    script = ("import sys; from trainer.data import TokenWindows\n"
              f"TokenWindows({str(layout.tokens_dir(neko_data))!r}).get([0]); print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]


def test_token_windows_missing_manifest_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `t5ja prep`"):
        TokenWindows(tmp_path)


def test_nonfinite_policy_skips_up_to_the_bound_then_stops():
    assert get_stop_reason("stop", num_skipped=0, max_skips=20) == "train.nonfinite_loss=stop"
    assert get_stop_reason("skip", num_skipped=0, max_skips=2) is None
    assert get_stop_reason("skip", num_skipped=1, max_skips=2) is None
    assert "train.max_nonfinite_skips=2" in get_stop_reason("skip", num_skipped=2, max_skips=2)
    assert get_stop_reason("skip", num_skipped=0, max_skips=0) is not None  # 0: never skip


def test_train_state_of_older_checkpoints_loads_without_nonfinite_skips():
    older = {"step": 30, "consumed_samples": 480, "consumed_tokens": 67680, "restarts": [], "mlflow_run_id": None}
    assert TrainState(**older).nonfinite_skips == 0


def test_fault_hooks_act_on_the_last_rank_only():
    env = {faults.CRASH_AT_STEP: "15", faults.NONFINITE_AT_STEPS: "12, 13"}
    assert faults.Faults.from_env(rank=0, world_size=2, env=env) == faults.Faults()
    last = faults.Faults.from_env(rank=1, world_size=2, env=env)
    assert last == faults.Faults(15, frozenset({12, 13}))
    assert faults.Faults.from_env(rank=1, world_size=2, env={}) == faults.Faults()
    loss = torch.tensor(2.0)
    assert math.isnan(last.maybe_nonfinite(loss, step=12, micro_step=0))
    assert last.maybe_nonfinite(loss, step=12, micro_step=1) == 2.0  # one NaN per step is enough
    assert last.maybe_nonfinite(loss, step=14, micro_step=0) == 2.0


def test_crash_hook_fires_in_the_first_torchrun_round_only(monkeypatch):
    kills = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: kills.append(sig))
    hooks = faults.Faults(crash_at_step=15)
    hooks.maybe_crash(14)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    hooks.maybe_crash(15)
    assert kills == []
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    hooks.maybe_crash(15)
    assert kills == [signal.SIGKILL]


def test_restart_on_a_shared_store_gets_a_prefix_of_its_own():
    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert get_store_prefix({**shared, "TORCHELASTIC_RESTART_COUNT": "0"}) is None  # first round: fresh keys
    assert get_store_prefix({**shared, "TORCHELASTIC_RESTART_COUNT": "2"}) == "t5ja/restart_2/"
    # what the launcher arranges (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): a new store per round
    assert get_store_prefix({"TORCHELASTIC_USE_AGENT_STORE": "False", "TORCHELASTIC_RESTART_COUNT": "2"}) is None
    assert get_store_prefix({}) is None  # not under torchrun


def test_resume_refuses_another_global_batch_size():
    from trainer.checkpoint import TrainState
    from trainer.train import check_data_position

    state = TrainState(step=10, consumed_samples=160)
    check_data_position(state, 16, "step_00000010")  # same global batch: fine
    with pytest.raises(ValueError, match="train.global_batch_size=16"):
        check_data_position(state, 32, "step_00000010")
    check_data_position(TrainState(), 32, "step_00000000")


def test_deepspeed_is_imported_without_mlflow_or_inductor():
    """DeepSpeed's autotuner imports MLflow (~2.8 s per worker start) unless it is hidden, and
    the Muon module its ZeRO optimizers import would import TorchInductor (~3 s) for
    torch.compile; MLflow stays importable, Muon's kernels eager, DeepSpeed's compile() as it was."""
    script = ("import sys; from trainer.distributed import import_deepspeed; import_deepspeed()\n"
              "from deepspeed.autotuning import autotuner\n"
              "print('mlflow' in sys.modules, autotuner.has_mlflow)\n"
              "from deepspeed.runtime import compiler\n"
              "from deepspeed.runtime.zero.muon import original_muon\n"
              "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam\n"
              "print(compiler.compile() is compiler.dummy_decorator, 'torch._inductor' in sys.modules,\n"
              "      type(original_muon.zeropower_via_newtonschulz5).__name__)\n"
              "import mlflow; print(mlflow.__name__)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"}).stdout.split()
    assert out == ["False", "False", "False", "False", "function", "mlflow"]


def test_heap_settle_frees_cyclic_garbage_then_freezes_and_resumes_collection():
    """A worker starts with automatic collection off (trainer/heap.py): each settle must still
    free the garbage so far, freeze the rest, and the last one turn collection back on."""
    script = ("import gc, weakref\n"
              "from trainer import heap\n"
              "heap.pause_collection()\n"
              "class Node: pass\n"
              "node = Node(); node.me = node; ref = weakref.ref(node); del node\n"
              "heap.settle(); print(ref() is None, gc.get_freeze_count() > 0, gc.isenabled())\n"
              "heap.settle(resume_collection=True); print(gc.isenabled())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "False", "True"]


def test_collection_paused_turns_collection_back_on_even_after_an_error():
    script = ("import gc\n"
              "from trainer import heap\n"
              "try:\n"
              "    with heap.collection_paused():\n"
              "        print(gc.isenabled())\n"
              "        raise ImportError('a command failing on an import')\n"
              "except ImportError:\n"
              "    pass\n"
              "print(gc.isenabled(), gc.get_freeze_count() > 0)\n"
              "gc.disable()\n"  # a rank before its first step: collection stays off
              "with heap.collection_paused():\n"
              "    pass\n"
              "print(gc.isenabled())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True", "False"]
