"""launcher.estimate: exact parameter counts on the meta device and DeepSpeed's ZeRO estimators."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from launcher.estimate import (GIB, Estimate, EstimateConfig, ModelSize, estimate_job, format_table,
                               get_estimate_rows, get_model_size, get_recommendation,
                               load_estimate_inputs)
from conftest import ROOT
from trainer.model import ModelConfig

GEMMA_7B = ModelSize(786_825_216 + 7_751_248_896, 786_825_216)  # trainer/model.py's own figures


def _rows(size: ModelSize, nodes: int, gpus: int) -> dict:
    return {(r.stage, r.offload): r for r in get_estimate_rows(size, nodes, gpus, EstimateConfig())}


def test_parameter_counts_are_exact_and_count_tied_embeddings_once():
    assert get_model_size(ModelConfig(preset="gemma-7b"), 0) == GEMMA_7B
    assert get_model_size(ModelConfig(preset="t5-base-ja"), 0).total_params == 222_903_552


def test_zero2_and_zero3_are_deepspeeds_own_figures():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = _rows(GEMMA_7B, 2, 8)
    assert (rows[2, "none"].cpu_bytes, rows[2, "none"].gpu_bytes) == estimate_zero2_model_states_mem_needs(
        GEMMA_7B.total_params, num_gpus_per_node=8, num_nodes=2, cpu_offload=False)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(GEMMA_7B.total_params, GEMMA_7B.largest_layer_params, 8, 2,
                                                        cpu_offload=True, cpu_offload_params=True, zero_init=False)
    assert (rows[3, "optimizer+params"].cpu_bytes, rows[3, "optimizer+params"].gpu_bytes) == (cpu, gpu)


def test_zero1_keeps_the_16bit_gradients_whole():
    params = GEMMA_7B.total_params
    single, eight = _rows(GEMMA_7B, 1, 1), _rows(GEMMA_7B, 1, 8)
    assert single[1, "none"].gpu_bytes == single[2, "none"].gpu_bytes  # one GPU: nothing to partition
    assert eight[1, "none"].gpu_bytes - eight[2, "none"].gpu_bytes == pytest.approx(2 * params * 7 / 8, abs=8)
    assert eight[1, "optimizer"].gpu_bytes == eight[2, "optimizer"].gpu_bytes + 2 * params


def test_gemma_7b_needs_offload_on_one_80gb_gpu_but_not_on_eight():
    single, eight = _rows(GEMMA_7B, 1, 1), _rows(GEMMA_7B, 1, 8)
    assert [key for key, row in single.items() if row.fits and row.offload == "none"] == []
    assert single[3, "optimizer+params"].fits
    assert all(row.fits for row in eight.values())
    assert eight[3, "none"].gpu_bytes < eight[2, "none"].gpu_bytes < eight[1, "none"].gpu_bytes


def test_table_and_recommendation():
    estimate = Estimate("gemma-7b", GEMMA_7B, 1, 1, 80 * GIB, get_estimate_rows(GEMMA_7B, 1, 1, EstimateConfig()))
    table = format_table(estimate)
    assert "8,538,074,112 parameters" in table and "1 node(s) x 1 GPU(s), 80 GiB per GPU" in table
    assert "ZeRO-3 optimizer+params" in table and "zero3_offload" in table
    assert get_recommendation(estimate).startswith("smallest setting whose model states fit: ZeRO-1 with optimizer")
    rows = get_estimate_rows(GEMMA_7B, 1, 1, EstimateConfig(gpu_memory_gib=1))
    tiny_gpu = Estimate("gemma-7b", GEMMA_7B, 1, 1, GIB, rows)
    assert get_recommendation(tiny_gpu).startswith("no setting fits")


JOB = """name: tiny
data:
  inputs: [{path: corpora/not-there-yet/*.txt}]
  output_dir: data/tiny
tokenizer: {vocab_size: 4000, num_sentinels: 100}
model: {preset: t5-tiny}
objective: {name: span_corruption}
"""


def test_estimate_job_needs_no_corpus_and_sizes_the_vocabulary_prep_will_train(tmp_path):
    (tmp_path / "job.yaml").write_text(JOB, encoding="utf-8")
    inputs = load_estimate_inputs(tmp_path / "job.yaml", ["launcher.nnodes=2", "launcher.nproc_per_node=4"])
    estimate = estimate_job(inputs, EstimateConfig())
    assert (estimate.num_nodes, estimate.gpus_per_node) == (2, 4) and len(estimate.rows) == 7
    assert "= 4100 (no tokenizer trained yet)" in estimate.vocab_note
    assert estimate.size.largest_layer_params == 4224 * 128  # vocab rounded up to a multiple of 128
    # A causal preset in a span-corruption job: fine for an estimate (load_job would refuse it).
    gemma = load_estimate_inputs(tmp_path / "job.yaml", ["model.preset=gemma-2b"])
    assert estimate_job(gemma, EstimateConfig()).size.total_params == 2_506_434_560


def test_job_problems_are_listed_with_their_yaml_path(tmp_path):
    from launcher.job import ConfigError

    (tmp_path / "job.yaml").write_text(JOB, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_estimate_inputs(tmp_path / "job.yaml", ["model.preset=gemma-9b", "launcher.nnodes=0"])
    assert [path for path, _ in err.value.problems] == ["launcher.nnodes", "model.preset"]


def test_bad_settings_are_named():
    with pytest.raises(ValidationError, match="gpu_memory_gib"):
        EstimateConfig(gpu_memory_gib=0)
    with pytest.raises(ValueError, match="at least 1 node"):
        get_estimate_rows(GEMMA_7B, 0, 8, EstimateConfig())


def test_cli_prints_the_table_and_refuses_a_bad_gpu_size(capsys):
    from launcher.cli import main

    assert main(["estimate", str(ROOT / "configs/t5-base-ja.yaml"), "launcher.nproc_per_node=8",
                 "train.micro_batch_size=1"]) == 0
    out = capsys.readouterr().out
    assert "t5-base-ja: 222,903,552 parameters" in out and "ZeRO-3 optimizer+params" in out
    assert main(["estimate", str(ROOT / "configs/t5-base-ja.yaml"), "--gpu-memory-gib", "-1"]) == 2
    assert "gpu_memory_gib" in capsys.readouterr().err


def test_init_from_is_sized_from_its_config_and_a_missing_one_from_the_preset(tmp_path):
    """from_pretrained cannot load onto the meta device: the directory's config.json is built
    instead (the model the job trains), and the preset stands in until the directory exists."""
    from transformers import GemmaConfig

    GemmaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32).save_pretrained(tmp_path / "model")
    size = get_model_size(ModelConfig(preset="gemma-7b", init_from=str(tmp_path / "model")), 0)
    attention = 2 * 64 * (2 * 32) + 2 * 64 * (1 * 32)  # q, o: 2 heads; k, v: 1 KV head; head_dim 32
    assert size.total_params == 1000 * 64 + 3 * (attention + 3 * 64 * 128 + 2 * 64) + 64
    missing = ModelConfig(preset="gemma-7b", init_from=str(tmp_path / "not-downloaded-yet"))
    assert get_model_size(missing, 0) == GEMMA_7B
