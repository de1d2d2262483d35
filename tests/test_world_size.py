"""Changing the world size: a run resumes on another number of ranks through DeepSpeed's
universal checkpoints and reads exactly the samples an uninterrupted run would.

Pure logic first (the data position, topology detection, the atomic conversion, the ZeRO-3
repair, RNG fallback); then real `t5ja train` -> torchrun -> DeepSpeed on CPU, per ZeRO
stage: the 2-rank reference run's step-30 checkpoint resumed on 1 rank (converted ahead by
`t5ja checkpoint convert`), and that run's step-35 checkpoint resumed on 2 ranks (converted
by the trainer itself).

What the end-to-end tests compare, and why. The resumed run is compared with the run that
wrote its checkpoint, continued on that run's own world size (the reference run for 2 -> 1,
the 1-rank continuation for 1 -> 2): both start from the same state and read the same
samples, so they differ only by the order of floating-point reductions (how gradients are
summed over micro-batches and ranks). Measured on this set-up over 5-10 steps after the
resume: losses within 2.4e-6 (relative 5e-7), weights within 6.5e-5 (largest |w| is 5).
The tolerances (losses: relative 1e-5; weights: 1e-3 + 1e-4 * |w|) leave a margin of 15-20x
over that, and stay far below what a broken resume does: DeepSpeed 0.19.8's unrepaired
ZeRO-3 universal load (a shared Adam step counter) drifts 3.5e-3 in loss and 4.7e-3 in
weights, a lost optimizer state or a shifted batch more. Comparing with an uninterrupted run
on the *other* world size would not test anything: this set-up (lr 1e-2 on ~16 windows) is
chaotic enough that the 1-rank and 2-rank reference runs themselves, identical to 1e-6 for
the first 10 steps, end 0.04 apart in loss after 40.
"""

from __future__ import annotations

import json
import random
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import MICRO_BATCH_SIZE, REFERENCE_STEPS, run_t5ja
from conftest import train_args as reference_train_args
from trainer import checkpoint as ckpt
from trainer import universal
from trainer.data import BatchPlan
from trainer.metrics import read_records

GLOBAL_BATCH = 16  # conftest.train_args
LOSS_RTOL = 1e-5
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 1e-3


# ---- the data position ----------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_each_step_reads_the_same_micro_batches_on_any_world_size(world_size):
    """Step k reads samples [kG, (k+1)G) once each, in the same micro-batches of 4 whatever the
    world size: the gradient is the mean of the same micro-batch losses."""
    plan = BatchPlan(GLOBAL_BATCH, 4, world_size)
    assert plan.accumulation_steps * world_size * 4 == GLOBAL_BATCH
    for step in (0, 1, 30, 35):
        micro_batches = [tuple(plan.micro_batch_indices(step, m, r).tolist())
                         for m in range(plan.accumulation_steps) for r in range(world_size)]
        start = step * GLOBAL_BATCH
        assert sorted(i for batch in micro_batches for i in batch) == list(range(start, start + GLOBAL_BATCH))
        assert set(micro_batches) == {tuple(range(start + 4 * k, start + 4 * k + 4)) for k in range(4)}


# ---- topology -----------------------------------------------------------------------------

def test_resize_reason():
    two = {"world_size": 2, "dp_world_size": 2, "zero_stage": 2}
    assert universal.get_resize_reason(two, dict(two)) is None
    assert "data-parallel size 2, resuming with 1" in universal.get_resize_reason(
        two, {**two, "world_size": 1, "dp_world_size": 1})
    assert "ZeRO-2" in universal.get_resize_reason(two, {**two, "zero_stage": 3})
    assert universal.get_resize_reason({**two, "zero_stage": None}, {**two, "zero_stage": 1}) is None  # unknown


def _touch(directory: Path, *names: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"x")
    return directory


def test_topology_of_older_checkpoints_is_inferred_from_file_names(tmp_path):
    zero2 = _touch(tmp_path / "z2", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                   "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank0.pt", "rng_rank1.pt")
    (zero2 / ckpt.MANIFEST).write_text('{"files": []}')
    assert ckpt.get_saved_topology(zero2) == {"world_size": 2, "dp_world_size": 2, "zero_stage": None}
    zero3 = _touch(tmp_path / "z3", "zero_pp_rank_0_mp_rank_00_model_states.pt",
                   "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt")
    assert universal.infer_topology(zero3) == {"world_size": 1, "dp_world_size": 1, "zero_stage": 3}


def test_manifest_records_the_topology(tmp_path):
    staging = _touch(tmp_path / "step_00000010.staging", "rng_rank0.pt")
    topology = {"world_size": 1, "dp_world_size": 1, "zero_stage": 3, "deepspeed": "x"}
    ckpt.publish(staging, tmp_path / "step_00000010", topology)
    assert ckpt.get_saved_topology(tmp_path / "step_00000010") == topology
    assert not ckpt.get_checkpoint_problems(tmp_path / "step_00000010", "sha256")


# ---- conversion: atomic, reused, redone when damaged ------------------------------------------

class FakeConverter:
    """Stands in for DeepSpeed's ds_to_universal: writes a few files, or fails half-way."""

    def __init__(self):
        self.calls = 0
        self.fail = False

    def __call__(self, ckpt_path: Path, out_path: Path, num_workers: int = 1) -> None:
        self.calls += 1
        _touch(out_path / "zero" / "shared.weight", "fp32.pt", "exp_avg.pt")
        if self.fail:
            raise AssertionError("converter failed half-way")


def test_conversion_is_atomic_reused_and_redone_when_damaged(tmp_path, monkeypatch):
    fake = FakeConverter()
    monkeypatch.setattr(universal, "convert", fake)
    step = _touch(tmp_path / "step_00000030", "mp_rank_00_model_states.pt")

    fake.fail = True
    with pytest.raises(AssertionError):
        ckpt.ensure_universal(step, "sha256")
    assert not (step / ckpt.UNIVERSAL).exists()  # a crashed conversion is never visible

    fake.fail = False
    out = ckpt.ensure_universal(step, "sha256")
    assert out == step / ckpt.UNIVERSAL and (out / ckpt.MANIFEST).is_file()
    assert not (step / (ckpt.UNIVERSAL + ckpt.STAGING_SUFFIX)).exists()
    assert not ckpt.get_checkpoint_problems(out, "sha256")

    assert ckpt.ensure_universal(step, "sha256") == out and fake.calls == 2  # reused
    (out / "zero" / "shared.weight" / "fp32.pt").write_bytes(b"damaged")
    ckpt.ensure_universal(step, "sha256")
    assert fake.calls == 3 and not ckpt.get_checkpoint_problems(out, "sha256")


def test_checkpoint_convert_exit_code_for_a_non_run_directory(tmp_path):
    result = run_t5ja("checkpoint", "convert", str(tmp_path))
    assert result.returncode == 2 and "not a run directory" in result.stderr


# ---- the ZeRO-3 repair and the RNG fallback ----------------------------------------------------

def test_repair_zero3_optimizer_unshares_step_and_restores_group_settings(tmp_path):
    flats = [torch.zeros(4), torch.zeros(2)]
    shared_step = torch.tensor(30.0)
    base = types.SimpleNamespace(
        state={flats[0]: {"step": shared_step}, flats[1]: {"step": shared_step}},
        # what DeepSpeed 0.19.8 leaves: group 0's settings copied into every group
        param_groups=[{"params": [], "weight_decay": 0.1, "lr": 1.0}, {"params": [], "weight_decay": 0.1, "lr": 1.0}],
    )
    saved_groups = [{"params": [0], "weight_decay": 0.1, "lr": 1.0}, {"params": [1], "weight_decay": 0.0, "lr": 1.0}]
    (tmp_path / "zero").mkdir()
    torch.save({"optimizer_state_dict": {"param_groups": saved_groups}}, tmp_path / "zero" / "optimizer_state.pt")
    universal.repair_zero3_optimizer(types.SimpleNamespace(optimizer=base, fp32_partitioned_groups_flat=flats),
                                     tmp_path)
    steps = [base.state[f]["step"] for f in flats]
    steps[0] += 1  # what torch's Adam does, in place
    assert steps[1].item() == 30.0
    assert [g["weight_decay"] for g in base.param_groups] == [0.1, 0.0]
    assert all(g["params"] == [] for g in base.param_groups)


def test_a_rank_without_rng_state_is_seeded_from_seed_step_and_rank(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"train": {"seed": 42}}))
    draws = {}
    for rank in (1, 1, 2):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        ckpt.load_rng_state(tmp_path, step=30)
        draws.setdefault(rank, []).append((random.random(), np.random.rand(), torch.rand(()).item()))
    assert draws[1][0] == draws[1][1] and draws[1][0] != draws[2][0]
    assert universal.fallback_rng_seed(42, 30, 1) != universal.fallback_rng_seed(42, 31, 1)


def test_a_rank_with_rng_state_gets_its_own_back(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    torch.manual_seed(7)
    torch.save(ckpt.get_rng_state(), tmp_path / "rng_rank0.pt")
    expected = torch.rand(3)
    torch.manual_seed(8)
    ckpt.load_rng_state(tmp_path, step=30)
    assert torch.equal(torch.rand(3), expected)


# ---- real runs: 2 -> 1 -> 2 ranks ----------------------------------------------------------------

STEPS = REFERENCE_STEPS


def train_args(out: Path, data: Path, stage: str, *extra: str) -> list[str]:
    # A checkpoint every 5 steps gives the 1-rank run one at step 35 to resume on 2 ranks from;
    # it changes no number of the training. MLflow is not under test here.
    return reference_train_args(out, data, stage, "mlflow.enabled=false", "checkpoint.every_steps=5", *extra)


def copy_as_of(src: Path, dst: Path, step: int) -> None:
    """`src` as it was when checkpoint `step` was its newest: later checkpoints, metrics and the
    export removed, as if the job had stopped right after saving it."""
    shutil.copytree(src, dst)
    for path in (dst / "checkpoints").glob("step_*"):
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)
    (dst / "checkpoints" / "latest").write_text(ckpt.tag_for(step) + "\n")
    shutil.rmtree(dst / "export")
    rows = (dst / "metrics.jsonl").read_text().splitlines(keepends=True)
    (dst / "metrics.jsonl").write_text("".join(r for r in rows if json.loads(r).get("step", 0) <= step))


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = read_records(run_dir / "metrics.jsonl")
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def train_state(run_dir: Path, step: int = STEPS) -> dict:
    return json.loads((run_dir / "checkpoints" / ckpt.tag_for(step) / "train_state.json").read_text())


def assert_continues(run_dir: Path, source: Path, from_step: int) -> None:
    """Every step logged once, from 1 to the end; after the resume, losses and final weights
    as `source` (see the module docstring for the tolerances)."""
    got = losses(run_dir)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    want = dict(losses(source))
    for step, loss in got[from_step:]:
        assert loss == pytest.approx(want[step], rel=LOSS_RTOL), step
    ref = load_file(source / "export" / "model.safetensors")
    for name, tensor in load_file(run_dir / "export" / "model.safetensors").items():
        torch.testing.assert_close(tensor, ref[name], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)


def assert_data_position(run_dir: Path, restarts: list[int], changes: list[tuple[int, int, int]]) -> None:
    state = train_state(run_dir)
    assert state["step"] == STEPS and state["restarts"] == restarts
    assert state["consumed_samples"] == GLOBAL_BATCH * STEPS  # no sample lost or repeated
    assert state["world_size_changes"] == [{"step": s, "from_world_size": a, "to_world_size": b}
                                           for s, a, b in changes]


def assert_world_size_recorded(run_dir: Path, world_size: int) -> None:
    """The launcher re-derived the accumulation; the final checkpoint says who wrote it."""
    run = json.loads((run_dir / "config.json").read_text())["run"]
    assert (run["world_size"], run["gradient_accumulation_steps"]) == (world_size, GLOBAL_BATCH // (MICRO_BATCH_SIZE * world_size))
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == GLOBAL_BATCH // (MICRO_BATCH_SIZE * world_size)
    manifest = json.loads((run_dir / "checkpoints" / ckpt.tag_for(STEPS) / ckpt.MANIFEST).read_text())
    assert manifest["topology"]["world_size"] == manifest["topology"]["dp_world_size"] == world_size


@pytest.fixture(scope="module")
def two_to_one(reference_run, tmp_path_factory, tiny_data):
    """The 2-rank reference run as of step 30, converted by `t5ja checkpoint convert`, then
    finished on 1 rank. Returns (stage, reference run dir, resumed run dir, convert, train)."""
    stage, _, reference = reference_run
    out = tmp_path_factory.mktemp(f"two-to-one-{stage}")
    copy_as_of(reference, out / "run", 30)
    convert = run_t5ja("checkpoint", "convert", str(out / "run"), "--step", "30")
    converted = (out / "run/checkpoints/step_00000030/universal/manifest.json").is_file()
    resumed = run_t5ja(*train_args(out, tiny_data, stage, "launcher.nproc_per_node=1"))
    return stage, reference, out / "run", (convert, converted), resumed


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_ranks_resume_on_one(two_to_one):
    stage, reference, run_dir, (convert, converted), resumed = two_to_one
    assert convert.returncode == 0 and converted, convert.stderr[-3000:]
    assert "saved with data-parallel size 2" in convert.stdout
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    log = (run_dir / "logs/rank_0.log").read_text()
    assert "saved with data-parallel size 2, resuming with 1" in log
    assert "continue at global sample 480 (step 30)" in log
    assert "converted step_00000030" not in log  # the CLI's conversion was used
    assert_data_position(run_dir, restarts=[30], changes=[(30, 2, 1)])
    assert_world_size_recorded(run_dir, 1)
    assert_continues(run_dir, reference, from_step=30)


@pytest.mark.parametrize("reference_run", ["zero2"], indirect=True)
def test_checkpoint_convert_exit_code_for_a_missing_step(reference_run):
    """Nothing is written: the shared reference run stays as it was."""
    _, _, run_dir = reference_run
    missing = run_t5ja("checkpoint", "convert", str(run_dir), "--step", "7")
    assert missing.returncode == 2 and "step_00000007" in missing.stderr


@pytest.mark.multiproc
@pytest.mark.slow
# ZeRO-3 only (the stage whose universal load needed repairs): 2 -> 1 covers both stages, and
# one more 2-rank run per stage would cost make test a minute.
@pytest.mark.parametrize("reference_run", ["zero3"], indirect=True)
def test_one_rank_resumes_on_two(two_to_one, tmp_path, tiny_data):
    stage, _, one_rank, _, resumed = two_to_one
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    copy_as_of(one_rank, tmp_path / "run", 35)
    result = run_t5ja(*train_args(tmp_path, tiny_data, stage))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert "converted step_00000035 to a universal checkpoint" in (run_dir / "logs/rank_0.log").read_text()
    assert "no RNG state for rank 1" in (run_dir / "logs/rank_1.log").read_text()
    assert_data_position(run_dir, restarts=[30, 35], changes=[(30, 2, 1), (35, 1, 2)])
    assert_world_size_recorded(run_dir, 2)
    assert_continues(run_dir, one_rank, from_step=35)
