"""`t5ja export` of a causal LM (the gemma-tiny preset) from a ZeRO-3 checkpoint written by
the trainer's atomic save on 2 ranks: the Hugging Face directory loads with
AutoModelForCausalLM and reproduces the engine's logits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_t5ja
from launcher.job import ConfigError, load_job
from launcher.run import plan_run, write_run


def test_a_causal_lm_preset_is_refused_for_span_corruption(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_job(ROOT / "configs/quickstart.yaml", [f"output_dir={tmp_path}", "model.preset=gemma-tiny"])
    assert "gemma-tiny is a causal LM" in str(err.value.problems)


@pytest.mark.multiproc
def test_export_of_a_zero3_causal_lm_checkpoint_reproduces_the_engine(tmp_path, neko_data):
    from transformers import AutoModelForCausalLM

    # The job's sections as a causal-LM run would have them; the worker trains it (the
    # causal_lm objective itself belongs to fine-tuning), `t5ja export` exports it.
    job = load_job(ROOT / "configs/t5-tiny-zero3.yaml", [
        "name=gemma", f"output_dir={tmp_path}", f"data.output_dir={neko_data}", "deepspeed.config=zero3",
        "train.global_batch_size=4", "train.micro_batch_size=2", "mlflow.enabled=false"])
    plan = plan_run(job)
    plan.config["model"] = {"preset": "gemma-tiny", "overrides": {}}
    write_run(plan)
    env = {**os.environ, **plan.env}
    worker = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(ROOT / "tests/causal_export_worker.py"), str(plan.run_dir)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    result = run_t5ja("export", str(plan.run_dir), "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(model).__name__ == "GemmaForCausalLM"
    assert (tmp_path / "hf" / "spiece.model").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
    expected = torch.load(plan.run_dir / "engine_logits.pt")
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits.float()
    assert (logits - expected["logits"]).abs().max().item() < 1e-4
