"""Job files: shipped configs validate; broken ones report every problem at once (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.ds_config import BatchSizes, fill_ds_config
from launcher.job import ConfigError, load_job
from trainer.config import TrainConfig

from conftest import NEKO, ROOT, run_t5ja

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path: Path, tmp_path: Path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    # Recipes for real clusters point at corpora, models and task files that are not in the
    # repo: stand small local ones in for them so that everything else in the file is checked.
    overrides = [f"data.inputs.{i}.path={NEKO}" for i, p in enumerate(load_job_inputs(raw)) if not list(ROOT.glob(p))]
    overrides += stand_in_paths(raw, tmp_path)
    job = load_job(path, overrides, base_dir=ROOT)
    assert job.train.global_batch_size % (job.train.micro_batch_size * job.world_size) == 0


def load_job_inputs(raw: dict) -> list[str]:
    inputs = (raw.get("data") or {}).get("inputs", [])
    return [i if isinstance(i, str) else i["path"] for i in inputs]


def stand_in_paths(raw: dict, tmp_path: Path) -> list[str]:
    """Overrides for a model.init_from directory and task files that do not exist here."""
    overrides = []
    init_from = (raw.get("model") or {}).get("init_from")
    if init_from and not (ROOT / init_from).is_dir():
        model_dir = tmp_path / "model"
        model_dir.mkdir()
        (model_dir / "config.json").write_text("{}")
        (model_dir / "spiece.model").write_bytes(b"")
        overrides.append(f"model.init_from={model_dir}")
    for key in ("path", "train_file", "eval_file"):
        value = (raw.get("task") or {}).get(key)
        if value and not (ROOT / value).is_file():
            (tmp_path / key).write_bytes(b"")
            overrides.append(f"task.{key}={tmp_path / key}")
    return overrides


BROKEN = """
name: "two words"
surprise: 1
data:
  inputs: [does/not/exist/*.txt]
  output_dir: out
train:
  global_batch_size: 30
  micro_batch_size: 8
  precision: fp64
  lr: -1
model: {preset: t5-colossal}
deepspeed: {config: zero3}
launcher: {nproc_per_node: 2, typo_key: 1}
"""


def test_broken_config_reports_every_problem(tmp_path):
    job = tmp_path / "broken.yaml"
    job.write_text(BROKEN)
    with pytest.raises(ConfigError) as err:
        load_job(job, ["train.steps=0"], base_dir=tmp_path)
    paths = {p for p, _ in err.value.problems}
    assert paths == {"name", "surprise", "launcher.typo_key", "train.precision", "train.lr", "train.steps",
                     "data.inputs[0].path", "model.preset"}


def test_cross_section_problems_reported_together(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}},
                              "train_batch_size": 64}))
    with pytest.raises(ConfigError) as err:
        load_job(ROOT / "configs/quickstart.yaml",
                 ["train.global_batch_size=30", f"deepspeed.config={ds}", "data.pack_length=100"], base_dir=ROOT)
    text = str(err.value)
    assert "train.global_batch_size: 30 is not a multiple of train.micro_batch_size (8) x data-parallel size (2)" in text
    assert "offload_param needs ZeRO stage 3" in text
    assert "train_batch_size is 64 but the job derives 30" in text
    assert "data.pack_length: 100" in text


def test_cli_exit_code_2_without_traceback(tmp_path):
    job = tmp_path / "broken.yaml"
    job.write_text(BROKEN)
    result = run_t5ja("train", str(job), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "launcher.typo_key: unknown key" in result.stderr
    assert "model.preset: unknown preset 't5-colossal'" in result.stderr


def test_missing_job_file_is_a_config_error(tmp_path):
    result = run_t5ja("train", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "no such job file" in result.stderr


def test_overrides_layer_over_yaml():
    job = load_job(ROOT / "configs/quickstart.yaml", ["train.lr=1e-4", "launcher.nproc_per_node=1",
                                                      "model.overrides={d_model: 64}"], base_dir=ROOT)
    assert job.train.lr == 1e-4 and job.launcher.nproc_per_node == 1
    assert job.model.overrides == {"d_model": 64}
    assert Path(job.data.inputs[0].path).is_absolute()


def test_dry_run_prints_plan_and_writes_nothing(tmp_path):
    result = run_t5ja("train", str(ROOT / "configs/quickstart.yaml"), f"output_dir={tmp_path}", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert '"train_batch_size": 32' in result.stdout and '"gradient_accumulation_steps": 2' in result.stdout
    assert "torch.distributed.run --nnodes 1 --nproc-per-node 2" in result.stdout
    assert "-m trainer " + str(tmp_path / "quickstart" / "config.json") in result.stdout
    assert not any(tmp_path.iterdir())


def test_fill_ds_config_derives_batch_and_precision():
    ds = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    train = TrainConfig(global_batch_size=64, micro_batch_size=4, precision="bf16", grad_clip=0.5)
    filled = fill_ds_config(ds, train, BatchSizes(64, 4, 8))
    assert (filled["train_batch_size"], filled["train_micro_batch_size_per_gpu"],
            filled["gradient_accumulation_steps"]) == (64, 4, 2)
    assert filled["bf16"] == {"enabled": True} and filled["fp16"] == {"enabled": False}
    assert filled["gradient_clipping"] == 0.5
    assert filled["zero_optimization"] == ds["zero_optimization"]  # ZeRO knobs untouched


def test_help_explains_commands():
    result = run_t5ja("--help")
    assert result.returncode == 0
    for command in ("prep", "train", "quickstart"):
        assert command in result.stdout
    result = run_t5ja("train", "--help")
    assert "--dry-run" in result.stdout and "overrides" in result.stdout


def test_the_launcher_plans_a_run_without_importing_torch(tmp_path):
    """Every `t5ja train` runs this path before torchrun starts: importing torch here would add
    2+ s to each launch (torchrun and the workers import it anyway)."""
    code = ("import sys; from pathlib import Path; from launcher.job import load_job; "
            "from launcher.run import plan_run, write_run, finish_run; "
            f"job = load_job(Path('configs/quickstart.yaml'), ['output_dir={tmp_path}']); "
            "plan = plan_run(job); write_run(plan); finish_run(plan.run_dir, plan.config, 0); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'transformers')))")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
