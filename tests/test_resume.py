"""Training that survives: exact resume after kill -9, preemption by SIGTERM, a corrupted
checkpoint (a rank killed in the middle of a save: test_restarts.py). Real `t5ja train` ->
torchrun (2 ranks) -> DeepSpeed on CPU, killed with real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import REFERENCE_STEPS, ROOT, run_t5ja
from conftest import train_args as reference_train_args
from trainer.metrics import read_records

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

STEPS = REFERENCE_STEPS
EXIT_PREEMPTED = 75


def train_args(out: Path, data: Path, stage: str, *extra: str) -> list[str]:
    # MLflow is not under test here; a new sqlite store costs seconds of migrations.
    return reference_train_args(out, data, stage, "mlflow.enabled=false", *extra)


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (before a crash and after the resume) keeps the last."""
    rows = read_records(run_dir / "metrics.jsonl")
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def wait_for(predicate, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"finished before the expected point:\n{proc.stdout.read()[-3000:]}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "export" / "model.safetensors")


def assert_same_run(run_dir: Path, reference: Path, from_step: int) -> None:
    got, want = losses(run_dir), losses(reference)
    for step in range(from_step, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    ref_weights = weights(reference)
    for name, tensor in weights(run_dir).items():
        torch.testing.assert_close(tensor, ref_weights[name], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def straight(reference_run):
    stage, _, run_dir = reference_run
    return stage, run_dir


def kill_9_at(step: int, args: list[str], run_dir: Path) -> None:
    """`t5ja train args`, killed with SIGKILL (the launcher, torchrun and both ranks, as a
    node crash) once `step` is logged."""
    proc = start(args)
    wait_for(lambda: max(losses(run_dir), default=0) >= step, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("reference_run", ["zero3"], indirect=True)
def test_kill_9_at_step_23_then_resume_is_exact(straight, tmp_path, tiny_data):
    """ZeRO-2 goes through the same kill in the SIGTERM test below."""
    stage, reference = straight
    args = train_args(tmp_path, tiny_data, stage)
    kill_9_at(23, args, tmp_path / "run")
    resumed = run_t5ja(*args)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    state = json.loads((tmp_path / "run/checkpoints/step_00000040/train_state.json").read_text())
    assert state["restarts"] == [20] and state["consumed_samples"] == 16 * STEPS
    assert_same_run(tmp_path / "run", reference, from_step=21)


@pytest.mark.parametrize("reference_run", ["zero2"], indirect=True)
def test_sigterm_checkpoints_exits_75_and_resumes_exactly(straight, tmp_path, tiny_data):
    """SIGTERM at step 14, then (one run fewer than two tests) the kill -9 of the ZeRO-3 test
    above at step 23 of the resumed run: both resumes must be exact."""
    stage, reference = straight
    args = train_args(tmp_path, tiny_data, stage)
    proc = start(args)
    wait_for(lambda: max(losses(tmp_path / "run"), default=0) >= 14, proc)
    proc.send_signal(signal.SIGTERM)  # to `t5ja train` only: it passes the signal on
    assert proc.wait(timeout=180) == EXIT_PREEMPTED, proc.stdout.read()[-3000:]
    marker = json.loads((tmp_path / "run/preempted.json").read_text())
    assert marker["signal"] == "SIGTERM" and 14 <= marker["step"] < 20
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == marker["checkpoint"]
    kill_9_at(23, args, tmp_path / "run")
    assert not (tmp_path / "run/preempted.json").exists()
    resumed = run_t5ja(*args)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    state = json.loads((tmp_path / "run/checkpoints/step_00000040/train_state.json").read_text())
    assert state["restarts"] == [marker["step"], 20] and state["consumed_samples"] == 16 * STEPS
    # Steps after the first resume up to 20 are logged by the killed run, the rest by the last.
    assert_same_run(tmp_path / "run", reference, from_step=marker["step"] + 1)


@pytest.mark.parametrize("reference_run", ["zero2"], indirect=True)
def test_corrupt_checkpoint_is_detected_and_the_previous_one_used(straight, tmp_path, tiny_data):
    import shutil

    stage, reference = straight
    shutil.copytree(reference, tmp_path / "run")
    victim = max((tmp_path / "run/checkpoints/step_00000040").rglob("*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a half-written file
    result = run_t5ja(*train_args(tmp_path, tiny_data, stage, "train.steps=45"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "step_00000040 is unusable" in (tmp_path / "run/logs/rank_0.log").read_text()
    state = json.loads((tmp_path / "run/checkpoints/step_00000045/train_state.json").read_text())
    assert state["restarts"] == [30]


def worker_pid(launcher_pid: int, local_rank: str) -> int:
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if "trainer" in child.cmdline() and child.environ().get("LOCAL_RANK") == local_rank:
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank}")


@pytest.mark.parametrize("reference_run", ["zero3"], indirect=True)
def test_export_command_writes_a_loadable_model(straight, tmp_path):
    """From ZeRO-3 shards: the case that needs gathering."""
    from transformers import T5ForConditionalGeneration

    stage, reference = straight
    result = run_t5ja("export", str(reference), "--step", "30", "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr[-3000:]
    model = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf")
    final = T5ForConditionalGeneration.from_pretrained(reference / "export")
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), final.parameters()))  # step 30 != 40
    missing = run_t5ja("export", str(reference), "--step", "7")
    assert missing.returncode == 2 and "step_00000007" in missing.stderr

