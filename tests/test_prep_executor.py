"""The docs stage's executor: units across workers and Slurm tasks, global dedup, kill -9 and
rerun, bad inputs. Real processes throughout (a process pool, `t5ja prep` killed with SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

from data_prep import layout
from data_prep.config import DataConfig, TokenizerConfig
from data_prep.errors import PrepError
from data_prep.pipeline import run_prep
from data_prep.shards import list_shards

from conftest import NEKO, ROOT

PACK = 64
PARAGRAPHS = [p for p in NEKO.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def write_corpus(tmp: Path) -> list[Path]:
    """Two text files sharing some paragraphs: duplicates within a file and across files."""
    a = PARAGRAPHS[:300] + PARAGRAPHS[10:40]  # 30 duplicates inside a
    b = PARAGRAPHS[250:500] + PARAGRAPHS[0:20]  # 50 (250..299) + 20 (0..19) duplicates of a
    paths = [tmp / "a.txt", tmp / "b.txt"]
    for path, paragraphs in zip(paths, (a, b)):
        path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return paths


def data_config(inputs: list[Path], out: Path, **kw) -> DataConfig:
    # ~20 KB units: each file splits into several byte-range units.
    return DataConfig(inputs=[{"path": str(p), "format": "text"} for p in inputs], output_dir=str(out),
                      unit_bytes=20_000, max_line_bytes=10_000, shard_bytes=100_000, **kw)


def tokenizer_config() -> TokenizerConfig:
    return TokenizerConfig(vocab_size=2000, character_coverage=0.98, sample_sentences=20_000)


def read_docs(out: Path) -> list[dict]:
    rows = []
    for shard in list_shards(layout.docs_dir(out)):
        rows += pa.ipc.open_stream(pa.memory_map(str(shard))).read_all().select(["id", "text"]).to_pylist()
    return rows


def read_tokens(out: Path) -> bytes:
    return b"".join(shard.read_bytes() for shard in list_shards(layout.tokens_dir(out)))


def manifest(out: Path) -> dict:
    return json.loads((layout.docs_dir(out) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> Path:
    """One worker, one task: the result every other way of running must equal."""
    out = tmp_path_factory.mktemp("reference")
    run_prep(data_config(corpus, out, num_workers=1), tokenizer_config(), PACK)
    return out


def test_global_dedup_counts(reference):
    docs = read_docs(reference)
    texts = [d["text"] for d in docs]
    assert len(texts) == len(set(texts)) == 500
    totals = manifest(reference)["totals"]
    assert totals["num_docs_in"] == 330 + 270 and totals["dropped"]["duplicate"] == 100
    assert manifest(reference)["units"] > 4  # the files really were split into byte ranges


def test_two_workers_give_the_same_result(tmp_path, corpus, reference):
    run_prep(data_config(corpus, tmp_path, num_workers=2), tokenizer_config(), PACK)
    assert read_docs(tmp_path) == read_docs(reference)
    assert read_tokens(tmp_path) == read_tokens(reference)


def test_two_slurm_tasks_then_merge_give_the_same_result(tmp_path, corpus, reference, monkeypatch):
    data = data_config(corpus, tmp_path, num_workers=1)
    for task in (1, 0):  # order does not matter
        summary = run_prep(data, tokenizer_config(), PACK, task_index=task, num_tasks=2)
        assert summary["task"] == task and not layout.docs_dir(tmp_path).exists()  # no merge yet
    # Slurm's own variables select the share when no index is given.
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert run_prep(data, tokenizer_config(), PACK)["task"] == 1
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    run_prep(data, tokenizer_config(), PACK)  # the merge job: every unit is already done
    assert read_docs(tmp_path) == read_docs(reference)
    assert not layout.docs_work_dir(tmp_path).exists()


def test_docs_shards_load_with_datasets(reference):
    shard = list_shards(layout.docs_dir(reference))[0]
    ds = datasets.Dataset.from_file(str(shard))
    assert {"id", "source", "title", "url", "text", "quality_warnings"} <= set(ds.column_names)
    loaded = datasets.load_dataset("arrow", data_files=[str(p) for p in list_shards(layout.docs_dir(reference))],
                                   split="train", cache_dir=str(reference / "hf-cache"))
    assert loaded.num_rows == 500
    for entry in manifest(reference)["shards"]:
        assert entry["inputs"] and entry["rows"] > 0 and len(entry["sha256"]) == 64


PREP_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from test_prep_executor import data_config, tokenizer_config, PACK
from data_prep.pipeline import run_prep
inputs = [Path(p) for p in sys.argv[2:]]
run_prep(data_config(inputs, Path(sys.argv[1]), num_workers=1), tokenizer_config(), PACK)
"""


def start_prep(out: Path, corpus: list[Path]) -> subprocess.Popen:
    script = PREP_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"))
    return subprocess.Popen([sys.executable, "-c", script, str(out), *map(str, corpus)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_when(proc: subprocess.Popen, ready, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while not ready():
        assert proc.poll() is None, f"prep finished before the kill point: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("kill_point", ["units", "tokens"])
def test_kill_9_and_rerun_equals_an_uninterrupted_run(tmp_path, corpus, reference, kill_point):
    out = tmp_path / "out"
    work = layout.docs_work_dir(out)
    if kill_point == "units":  # some units finished, others not
        ready = lambda: work.is_dir() and len(list(work.glob("u-*[0-9]"))) >= 3
    else:  # docs/ done, the tokens stage under way
        ready = lambda: (out / "tokens.tmp").is_dir()
    kill_when(start_prep(out, corpus), ready)
    assert not (layout.tokens_dir(out) / "_SUCCESS").exists()
    rerun = start_prep(out, corpus)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read().decode()[-3000:]
    assert read_docs(out) == read_docs(reference)
    assert read_tokens(out) == read_tokens(reference)


def test_unreadable_input_fails_clearly_and_keeps_finished_units(tmp_path, corpus):
    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(b"this is not gzip at all")
    data = data_config([corpus[0], broken], tmp_path / "out", num_workers=1)
    with pytest.raises(PrepError, match="broken.txt.gz"):
        run_prep(data, tokenizer_config(), PACK)
    assert not layout.docs_dir(tmp_path / "out").exists()
    finished = list(layout.docs_work_dir(tmp_path / "out").glob("u-*[0-9]"))
    assert finished  # a rerun without the broken file reuses nothing (the plan changed) but nothing was lost


def test_rejected_share_threshold(tmp_path, reference):
    good = [json.dumps({"text": p}, ensure_ascii=False) for p in PARAGRAPHS[:40]]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(good[:20] + ["{broken json"] * 5 + good[20:]) + "\n", encoding="utf-8")
    inputs = [{"path": str(path), "format": "jsonl"}]
    strict = DataConfig(inputs=inputs, output_dir=str(tmp_path / "strict"), max_rejected_share=0.05)
    existing = TokenizerConfig(path=str(layout.tokenizer_dir(reference)))
    with pytest.raises(PrepError, match=r"5 of 45 records rejected"):
        run_prep(strict, existing, PACK)
    lenient = DataConfig(inputs=inputs, output_dir=str(tmp_path / "lenient"), max_rejected_share=0.2)
    run_prep(lenient, existing, PACK)
    rejects = (layout.docs_dir(tmp_path / "lenient") / "rejects.jsonl").read_text().splitlines()
    assert [json.loads(r)["where"] for r in rejects] == [f"{path}:{n}" for n in range(21, 26)]
    assert manifest(tmp_path / "lenient")["totals"]["num_docs_out"] == 40


def test_cli_exit_code_for_unreadable_input(tmp_path):
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    job = tmp_path / "job.yaml"
    job.write_text(f"name: t\ndata:\n  inputs: [{broken}]\n  output_dir: {tmp_path / 'out'}\n")
    result = subprocess.run([sys.executable, "-m", "launcher.cli", "prep", str(job)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "broken.jsonl.gz" in result.stderr and "Traceback" not in result.stderr


def read_windows(out: Path) -> "np.ndarray":
    import numpy as np

    tables = [pa.ipc.open_stream(pa.memory_map(str(s))).read_all() for s in list_shards(layout.tokens_dir(out))]
    return np.concatenate([t.column("input_ids").combine_chunks().values.to_numpy() for t in tables])


def test_given_tokenizer_encodes_in_the_workers_with_the_same_windows(tmp_path, corpus, reference):
    """With tokenizer.path the docs workers encode as they go; the windows equal encoding docs/ after."""
    import numpy as np

    given = TokenizerConfig(path=str(layout.tokenizer_dir(reference)))
    logs = []
    run_prep(data_config(corpus, tmp_path, num_workers=2), given, PACK, log=logs.append)
    assert any("pre-encoded units, packed during the docs merge" in line for line in logs)  # pipeline.packing_alongside
    assert read_docs(tmp_path) == read_docs(reference)
    np.testing.assert_array_equal(read_windows(tmp_path), read_windows(reference))
    assert json.loads((layout.tokens_dir(tmp_path) / "manifest.json").read_text())["dropped_tail_tokens"] == \
        json.loads((layout.tokens_dir(reference) / "manifest.json").read_text())["dropped_tail_tokens"]


@pytest.mark.parametrize("packed", ["done", "killed"])
def test_windows_packed_during_the_merge_are_adopted_after_a_crash(tmp_path, corpus, reference, monkeypatch, packed):
    """The docs merge packs the pre-encoded units alongside; a run that dies before the tokens
    stage leaves them in the work directory, and the rerun's tokens stage takes them as they are;
    if the packing itself was killed, the tokens stage packs the units."""
    import numpy as np

    from data_prep import pipeline
    from data_prep.pack import PREPACKED_DIR, PREPACKED_FILE

    given = TokenizerConfig(path=str(layout.tokenizer_dir(reference)))
    data = data_config(corpus, tmp_path, num_workers=2)

    def die(*args, **kwargs):
        raise RuntimeError("killed before the tokenizer stage")

    monkeypatch.setattr(pipeline, "build_tokenizer", die)
    with pytest.raises(RuntimeError, match="killed"):
        run_prep(data, given, PACK)
    monkeypatch.undo()
    assert (layout.docs_dir(tmp_path) / "_SUCCESS").is_file()
    packed_dir = layout.docs_work_dir(tmp_path) / PREPACKED_DIR
    assert (packed_dir / PREPACKED_FILE).is_file()
    if packed == "killed":  # before its rename: only packed.tmp/ is left
        packed_dir.rename(packed_dir.with_name(packed_dir.name + ".tmp"))
    logs = []
    run_prep(data, given, PACK, log=logs.append)
    expected_log = "packed during the docs merge" if packed == "done" else "pre-encoded unit(s)"
    assert any(expected_log in line for line in logs), logs
    np.testing.assert_array_equal(read_windows(tmp_path), read_windows(reference))
    assert not layout.docs_work_dir(tmp_path).exists()


def test_repeats_within_a_unit_are_not_encoded_and_windows_stay_the_same(tmp_path, reference):
    """A repeat of an earlier text of its unit is written as EOS alone by the worker (the merge
    drops it): the windows still equal encoding docs/ after the merge."""
    import numpy as np

    from data_prep.pack import pack_tokens
    from data_prep.tokenizer import SPIECE_FILE

    paragraphs = PARAGRAPHS[:40]
    path = tmp_path / "repeats.txt"
    path.write_text("\n\n".join(p for p in paragraphs for _ in range(3)) + "\n", encoding="utf-8")  # each one thrice
    out = tmp_path / "out"
    given = TokenizerConfig(path=str(layout.tokenizer_dir(reference)))
    run_prep(data_config([path], out, num_workers=1), given, PACK)
    assert manifest(out)["totals"]["dropped"]["duplicate"] == 2 * len(paragraphs)
    again = tmp_path / "tokens-from-docs"
    again.mkdir()
    pack_tokens(layout.docs_dir(out), layout.tokenizer_dir(reference) / SPIECE_FILE, PACK, again, 100_000, 2000)
    tables = [pa.ipc.open_stream(pa.memory_map(str(s))).read_all() for s in list_shards(again)]
    from_docs = np.concatenate([t.column("input_ids").combine_chunks().values.to_numpy() for t in tables])
    np.testing.assert_array_equal(read_windows(out), from_docs)


def test_near_duplicates_removed_across_units_when_enabled(tmp_path, reference):
    """MinHash LSH over the whole corpus: a document with one sentence changed is dropped."""
    docs = ["\n".join(p.strip() for p in PARAGRAPHS[i:i + 12]) for i in range(0, 240, 12)]  # 20 long docs
    near = [d.replace("。", "。!", 1) for d in docs[:5]]  # first sentence altered slightly
    path = tmp_path / "near.txt"
    path.write_text("\n\n".join(docs + near) + "\n", encoding="utf-8")
    existing = TokenizerConfig(path=str(layout.tokenizer_dir(reference)))
    data = DataConfig(inputs=[{"path": str(path), "format": "text"}], output_dir=str(tmp_path / "out"),
                      dedup={"near": True, "near_threshold": 0.8})
    run_prep(data, existing, PACK)
    totals = manifest(tmp_path / "out")["totals"]
    assert totals["dropped"]["near_duplicate"] == 5 and totals["dropped"]["duplicate"] == 0
    assert len(read_docs(tmp_path / "out")) == 20


def test_unit_size_shrinks_for_small_corpora_down_to_a_floor(tmp_path):
    """A small corpus is cut into ~64 units so that no worker idles behind the last one, but
    never below 2 MiB (or max_line_bytes if smaller); a set unit_bytes is the upper bound."""
    from data_prep.units import MIN_AUTO_UNIT_BYTES, get_unit_bytes

    path = tmp_path / "big.txt"
    with open(path, "wb") as f:
        f.truncate(256 * 2**20)  # sparse: only its size matters here
    inputs = [{"path": str(path), "format": "text"}]
    assert get_unit_bytes(DataConfig(inputs=inputs, output_dir=str(tmp_path))) == 4 * 2**20  # 256 MiB / 64
    assert get_unit_bytes(DataConfig(inputs=inputs, output_dir=str(tmp_path), unit_bytes=2**24)) == 4 * 2**20
    assert get_unit_bytes(DataConfig(inputs=inputs, output_dir=str(tmp_path), unit_bytes=2**21,
                                     max_line_bytes=2**20)) == 2**21
    with open(path, "r+b") as f:
        f.truncate(10 * 2**20)
    assert get_unit_bytes(DataConfig(inputs=inputs, output_dir=str(tmp_path))) == MIN_AUTO_UNIT_BYTES
    assert get_unit_bytes(DataConfig(inputs=inputs, output_dir=str(tmp_path), unit_bytes=20_000,
                                     max_line_bytes=10_000)) == 20_000
    with open(path, "r+b") as f:
        f.truncate(100_000)  # 100 KB / 64 < max_line_bytes < 2 MiB
    assert get_unit_bytes(DataConfig(inputs=inputs, output_dir=str(tmp_path), unit_bytes=20_000,
                                     max_line_bytes=10_000)) == 10_000


def test_merge_mask_is_the_boolean_array_numpy_gives():
    import numpy as np

    from data_prep.merge import bool_array

    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 1000):
        mask = rng.random(n) < 0.5
        assert bool_array(mask).equals(pa.array(mask, type=pa.bool_()))
