"""Shared fixtures: the project root, a `t5ja` runner, and prepped token data built once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEKO = ROOT / "data_prep" / "samples" / "neko.txt"
INPUT_LENGTH = 128  # as configs/quickstart.yaml: windows of 141 tokens


def run_t5ja(*args: str, cwd: Path = ROOT, timeout: int = 900) -> subprocess.CompletedProcess:
    """The real CLI in a child process, as a user would run it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def neko_data(tmp_path_factory) -> Path:
    """data prep of the bundled sample: docs, a 4000-piece tokenizer, 141-token windows."""
    from data_prep.config import DataConfig, TokenizerConfig
    from data_prep.pipeline import run_prep
    from trainer.span_corruption import SpanCorruptionConfig

    out = tmp_path_factory.mktemp("neko-data")
    pack_length = SpanCorruptionConfig(input_length=INPUT_LENGTH).expanded_length
    run_prep(DataConfig(inputs=[{"path": str(NEKO)}], output_dir=str(out)),
             TokenizerConfig(vocab_size=4000, sample_sentences=100_000), pack_length=pack_length)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, neko_data) -> Path:
    """About 16 windows (one global batch of the multi-process tests) with neko's tokenizer:
    every step sees the same samples, so a working trainer must overfit them."""
    from data_prep import layout
    from data_prep.config import DataConfig, TokenizerConfig
    from data_prep.pipeline import run_prep
    from trainer.span_corruption import SpanCorruptionConfig

    out = tmp_path_factory.mktemp("tiny-data")
    text = out / "tiny.txt"
    lines = NEKO.read_text(encoding="utf-8").splitlines()
    text.write_text("\n".join(lines[:128]) + "\n", encoding="utf-8")
    pack_length = SpanCorruptionConfig(input_length=INPUT_LENGTH).expanded_length
    summary = run_prep(DataConfig(inputs=[{"path": str(text)}], output_dir=str(out / "data")),
                       TokenizerConfig(path=str(layout.tokenizer_dir(neko_data))), pack_length=pack_length)
    assert 16 <= summary["tokens"]["num_sequences"] <= 18
    return out / "data"
