"""Run-start health report: restart counts, crash count, the last worker error, and the
all-reduce bus-bandwidth probe (2 real gloo processes)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch.multiprocessing as mp

from trainer import run_health
from trainer.flops import t5_flops_per_sample


def write_error_file(run_dir, attempt: int, rank: int, message: str, timestamp: int) -> None:
    path = run_dir / "torchelastic" / "run_abc" / f"attempt_{attempt}" / str(rank) / "error.json"
    path.parent.mkdir(parents=True)
    body = {"message": {"message": message, "extraInfo": {"py_callstack": f"Traceback ...\n{message}",
                                                            "timestamp": str(timestamp)}}}
    path.write_text(json.dumps(body))


def test_start_report_counts_restarts_crashes_and_keeps_the_newest_error(tmp_path):
    write_error_file(tmp_path, 0, 1, "RuntimeError: first", 100)
    write_error_file(tmp_path, 1, 0, "ValueError: second", 200)
    run_health.record_failed_submission(tmp_path, 1)
    env = {"TORCHELASTIC_RESTART_COUNT": "2", "SLURM_RESTART_COUNT": "3"}
    metrics, tags = run_health.get_start_report(tmp_path, env)
    assert metrics == {"restarts/restart_count": 5, "restarts/torchrun_restarts": 2,
                       "restarts/slurm_requeues": 3, "errors/crash_count": 3}
    assert tags["restart_count"] == "5" and tags["crash_count"] == "3"
    assert tags["last_error"].startswith("ValueError: second") and "Traceback" in tags["last_error"]
    assert tags["last_error_file"] == "torchelastic/run_abc/attempt_1/0/error.json"


def test_start_report_of_a_first_clean_start(tmp_path):
    metrics, tags = run_health.get_start_report(tmp_path, {})
    assert metrics["restarts/restart_count"] == 0 and metrics["errors/crash_count"] == 0
    assert "last_error" not in tags


def test_unreadable_error_file_is_skipped_not_fatal(tmp_path):
    bad = tmp_path / "torchelastic" / "r" / "attempt_0" / "0" / "error.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{truncated")
    assert run_health.read_worker_errors(tmp_path) == []


def test_t5_flops_match_six_n_d_for_the_matmuls():
    """Without attention scores, FLOPs = 6 x (encoder params x input tokens + decoder params x
    target tokens): check against the parameter count of a real model."""
    from trainer.model import ModelConfig, build_model

    model = build_model(ModelConfig(preset="t5-tiny"), 1024)
    cfg = model.config
    flops = t5_flops_per_sample(cfg, 64, 16)
    inner = cfg.num_heads * cfg.d_kv
    attention = 12 * inner * (cfg.num_layers * 64 * 64 + cfg.num_decoder_layers * (16 * 16 + 16 * 64))
    encoder = sum(p.numel() for n, p in model.encoder.named_parameters() if p.dim() == 2 and "embed" not in n
                  and "relative_attention_bias" not in n)
    decoder = sum(p.numel() for n, p in model.decoder.named_parameters() if p.dim() == 2 and "embed" not in n
                  and "relative_attention_bias" not in n)
    head = cfg.d_model * cfg.vocab_size
    assert flops - attention == 6 * (encoder * 64 + (decoder + head) * 16)


def _probe(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    busbw = run_health.probe_allreduce_busbw(8 * 2**20, repeats=3)
    with open(f"{out}.{rank}", "w") as f:
        f.write(str(busbw))
    dist.destroy_process_group()


@pytest.mark.multiproc
def test_busbw_probe_agrees_on_every_rank(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_probe, args=(port, str(tmp_path / "busbw")), nprocs=2, start_method="spawn")
    values = [float((tmp_path / f"busbw.{rank}").read_text()) for rank in range(2)]
    assert values[0] == values[1] > 0
