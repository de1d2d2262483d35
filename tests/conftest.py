"""Shared fixtures: the project root, a `t5ja` runner, and prepped token data built once."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEKO = ROOT / "data_prep" / "samples" / "neko.txt"
INPUT_LENGTH = 128  # as configs/quickstart.yaml: windows of 141 tokens


# The files of the longest tests, longest first (the durations in docs/benchmarks.md). `make test`
# hands whole files to its two xdist workers in collection order: started first, these leave the
# short files to fill the end instead of one worker finishing a long file alone.
SLOW_FILES_FIRST = (
    "test_slurm.py", "test_resume.py", "test_restarts.py", "test_world_size.py", "test_finetune_jglue_train.py",
    "test_quickstart.py", "test_telemetry_training.py", "test_nonfinite.py", "test_finetune_train.py",
    "test_mlflow_server.py", "test_causal_export.py", "test_train_multiproc.py", "test_epochs.py",
    "test_telemetry.py", "test_finetune_eval.py", "test_prep_executor.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


def run_t5ja(*args: str, cwd: Path = ROOT, timeout: int = 900) -> subprocess.CompletedProcess:
    """The real CLI in a child process, as a user would run it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The directory `build(out)` fills, built once per pytest session rather than once per
    xdist worker: the first worker to ask builds it under a file lock while the others wait,
    then all read it. The reference runs alone took 7 trainings of 65-150 s in `make test`,
    where 2 do (session fixtures are per worker, and pytest sets a parametrized one up again
    each time its parameter changes). Only for what tests read and never write."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above each worker's popen-gwN
    out, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or its process dies
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # a worker that failed building it
            out.mkdir()
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def neko_data(tmp_path_factory) -> Path:
    """data prep of the bundled sample: docs, a 4000-piece tokenizer, 141-token windows."""
    from data_prep.config import DataConfig, TokenizerConfig
    from data_prep.pipeline import run_prep
    from trainer.span_corruption import SpanCorruptionConfig

    def build(out: Path) -> None:
        pack_length = SpanCorruptionConfig(input_length=INPUT_LENGTH).expanded_length
        run_prep(DataConfig(inputs=[{"path": str(NEKO)}], output_dir=str(out)),
                 TokenizerConfig(vocab_size=4000, sample_sentences=100_000), pack_length=pack_length)

    return built_once(tmp_path_factory, "neko-data", build)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, neko_data) -> Path:
    """About 16 windows (one global batch of the multi-process tests) with neko's tokenizer:
    every step sees the same samples, so a working trainer must overfit them."""
    from data_prep import layout
    from data_prep.config import DataConfig, TokenizerConfig
    from data_prep.pipeline import run_prep
    from trainer.span_corruption import SpanCorruptionConfig

    def build(out: Path) -> None:
        text = out / "tiny.txt"
        lines = NEKO.read_text(encoding="utf-8").splitlines()
        text.write_text("\n".join(lines[:128]) + "\n", encoding="utf-8")
        pack_length = SpanCorruptionConfig(input_length=INPUT_LENGTH).expanded_length
        summary = run_prep(DataConfig(inputs=[{"path": str(text)}], output_dir=str(out / "data")),
                           TokenizerConfig(path=str(layout.tokenizer_dir(neko_data))), pack_length=pack_length)
        assert 16 <= summary["tokens"]["num_sequences"] <= 18

    return built_once(tmp_path_factory, "tiny-data", build) / "data"


REFERENCE_STEPS = 40
# One micro batch per rank and step on 2 ranks (gradient accumulation 2 when one rank resumes
# a run: tests/test_world_size.py): a ZeRO-3 step on CPU costs 0.37 s instead of 0.52 s with
# two micro batches of 4, and every multi-process test runs tens of steps.
MICRO_BATCH_SIZE = 8


def train_args(out: Path, data: Path, stage: str, *extra: str) -> list[str]:
    """`t5ja train` arguments of the multi-process tests: t5-tiny on 2 ranks, 40 steps, a
    checkpoint every 10, the loss logged every step."""
    return ["train", str(ROOT / "configs/t5-tiny-zero3.yaml"), "name=run", f"output_dir={out}",
            f"data.output_dir={data}", f"deepspeed.config={stage}", f"train.steps={REFERENCE_STEPS}",
            "train.log_every=1", "train.global_batch_size=16", f"train.micro_batch_size={MICRO_BATCH_SIZE}", "train.lr=1e-2",
            "train.warmup_steps=5", "checkpoint.every_steps=10", "checkpoint.keep_last=2", *extra]


@pytest.fixture(scope="session")
def mlflow_db(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store, made by MLflow itself: its tables and every alembic
    migration cost seconds, paid once here instead of by each run that logs to MLflow (the
    quickstart test still has its run create the store)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    def build(root: Path) -> None:
        store = SqlAlchemyStore(f"sqlite:///{root / 'mlflow.db'}", (root / "mlartifacts").as_uri())
        store.engine.dispose()  # the file complete and closed before it is copied

    return built_once(tmp_path_factory, "mlflow-db", build) / "mlflow.db"


def seed_mlflow_db(template: Path, out: Path) -> None:
    """`out`'s default tracking store (OUTPUT_DIR/mlflow.db) starts as a copy of the empty one."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, out / "mlflow.db")


@pytest.fixture(scope="session", params=["zero2", "zero3"])
def reference_run(request, tmp_path_factory, tiny_data, mlflow_db):
    """One uninterrupted run per ZeRO stage on the ~16-window data set (every step sees the
    same samples): the overfit, layout, export and MLflow tests read it, and the resume tests
    compare their interrupted runs with it; none writes into it. Returns (stage, output dir,
    run dir)."""
    def build(out: Path) -> None:
        seed_mlflow_db(mlflow_db, out)
        result = run_t5ja(*train_args(out, tiny_data, request.param))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    out = built_once(tmp_path_factory, f"reference-{request.param}", build)
    return request.param, out, out / "run"


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory, neko_data) -> Path:
    """A randomly initialised t5-tiny saved as `t5ja export` saves one: weights + tokenizer files
    (neko's). The `model.init_from` of the fine-tuning runs."""
    from transformers import AutoTokenizer

    from data_prep import layout
    from trainer.model import ModelConfig, build_model

    out = tmp_path_factory.mktemp("init") / "t5-tiny-hf"
    tokenizer_dir = layout.tokenizer_dir(neko_data)
    model = build_model(ModelConfig(preset="t5-tiny"), len(AutoTokenizer.from_pretrained(tokenizer_dir)))
    model.save_pretrained(out, safe_serialization=True)
    for path in Path(tokenizer_dir).iterdir():
        if path.is_file():
            shutil.copy2(path, out / path.name)
    return out
