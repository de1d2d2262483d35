"""train.nonfinite_loss on real runs: `t5ja train` -> torchrun (2 ranks) -> DeepSpeed on CPU, with
NaN losses injected on rank 1 only (T5JA_FAULT_NONFINITE_AT_STEPS), so that rank 0 can only
learn of them through the ranks' agreement."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from test_resume import train_args
from trainer.metrics import read_records

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

EXIT_NONFINITE_LOSS = 3
# 8 steps, a checkpoint every 2, all kept; NaN losses in steps 5 and 6.
SHORT = ("train.steps=8", "checkpoint.every_steps=2", "checkpoint.keep_last=4")
NAN_STEPS = "5,6"


def run_with_faults(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, timeout=900)


def metrics(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_records(run_dir / "metrics.jsonl")
            if "train/loss" in m}


def checkpoint_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Every tensor of the step's DeepSpeed files (the module's weights; each rank's fp32 master
    weights, Adam moments and step counts), keyed by file and path inside it."""
    tensors = {}
    for path in sorted((run_dir / f"checkpoints/step_{step:08d}").glob("*_states.pt")):
        _collect(torch.load(path, map_location="cpu", weights_only=False), path.name, tensors)
    assert tensors
    return tensors


def _collect(value, key: str, out: dict) -> None:
    if torch.is_tensor(value):
        out[key] = value
    elif isinstance(value, dict):
        for k, v in value.items():
            _collect(v, f"{key}/{k}", out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _collect(v, f"{key}/{i}", out)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# DeepSpeed discards the poisoned update by a different check in each: ZeRO-1/2 fp32 the gradient
# norm, ZeRO-1/2 bf16 its inf/NaN test (bf16.check_grad_overflow), ZeRO-3 the norm in any precision.
@pytest.mark.parametrize("stage,precision", [("zero2", "fp32"), ("zero3", "bf16")])
def test_skip_drops_exactly_the_nonfinite_updates(tmp_path, tiny_data, stage, precision):
    result = run_with_faults(train_args(tmp_path, tiny_data, stage, *SHORT, f"train.precision={precision}",
                                        "train.nonfinite_loss=skip"),
                             T5JA_FAULT_NONFINITE_AT_STEPS=NAN_STEPS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "run"
    # Steps 5 and 6 changed nothing: not the weights, not Adam's moments or step count...
    assert same(checkpoint_tensors(run_dir, 4), checkpoint_tensors(run_dir, 6))
    # ...while the applied steps around them did (so the equality above is no accident).
    assert not same(checkpoint_tensors(run_dir, 2), checkpoint_tensors(run_dir, 4))
    assert not same(checkpoint_tensors(run_dir, 6), checkpoint_tensors(run_dir, 8))
    state = json.loads((run_dir / "checkpoints/step_00000008/train_state.json").read_text())
    assert state["nonfinite_skips"] == 2 and state["step"] == 8 and state["consumed_samples"] == 8 * 16
    rows = metrics(run_dir)
    assert [rows[s]["train/nonfinite_skips"] for s in (4, 5, 6, 7, 8)] == [0, 1, 2, 2, 2]
    assert all(math.isfinite(rows[s]["train/loss"]) for s in (4, 7, 8))
    # The learning rate stays a function of the step: DeepSpeed's scheduler was stepped on skips.
    model_states = torch.load(min((run_dir / "checkpoints/step_00000008").glob("*model_states.pt")),
                              weights_only=False)
    assert model_states["lr_scheduler"]["last_epoch"] == 8 and model_states["skipped_steps"] == 2
    rank0 = (run_dir / "logs/rank_0.log").read_text()  # rank 0's own losses were finite
    assert "step 5: non-finite loss on rank(s) 1: update skipped on every rank" in rank0


def test_stop_exits_3_and_keeps_the_checkpoint_before(tmp_path, tiny_data):
    args = train_args(tmp_path, tiny_data, "zero2", *SHORT)  # train.nonfinite_loss=stop: the default
    result = run_with_faults(args, T5JA_FAULT_NONFINITE_AT_STEPS=NAN_STEPS)
    assert result.returncode == EXIT_NONFINITE_LOSS, result.stdout[-3000:] + result.stderr[-3000:]
    assert ("step 5: non-finite loss on rank(s) 1; train.nonfinite_loss=stop. Stopped without saving this step; "
            "the latest checkpoint stays step_00000004.") in result.stderr
    ckpts = tmp_path / "run/checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000004"]
    assert max(metrics(tmp_path / "run")) == 4  # step 5 was never completed nor logged
    marker = json.loads((tmp_path / "run/nonfinite_loss.json").read_text())
    assert marker["step"] == 5 and marker["ranks"] == [1] and marker["checkpoint"] == "step_00000004"
