"""data_prep: readers, cleaning, docs shards, manifests, and run_prep end to end (pure CPU, fast)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
import sentencepiece as spm
from pydantic import ValidationError

from data_prep import layout
from data_prep.clean import clean_text
from data_prep.config import DataConfig, InputSpec, TokenizerConfig, resolve_input_files
from data_prep.pipeline import build_docs, run_prep
from data_prep.units import plan_units
from data_prep.readers import Reject, read_jsonl, read_text
from data_prep.shards import get_sha256

NEKO = Path(__file__).resolve().parents[1] / "data_prep" / "samples" / "neko.txt"
PACK_LENGTH = 128


def docs_stage(data: DataConfig, out: Path) -> dict:
    """The docs stage alone (units + merge) into `out`."""
    return build_docs(data, plan_units(data), out, log=lambda *_: None)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_rows(shard: Path) -> list[dict]:
    return pa.ipc.open_stream(pa.memory_map(str(shard))).read_all().to_pylist()


def read_manifest(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "manifest.json").read_text(encoding="utf-8"))


# --- readers ---------------------------------------------------------------------------


def test_text_reader_splits_documents_on_blank_lines(tmp_path):
    path = write_lines(tmp_path / "c.txt", ["", "a1", "a2", "", "", "", "b1", "", "c1"])
    docs = list(read_text(path))
    assert [d.text for d in docs] == ["a1\na2", "b1", "c1"]
    assert [d.where for d in docs] == [f"{path}:2", f"{path}:7", f"{path}:9"]


def test_text_reader_counts_invalid_utf8_lines(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("ok\n".encode() + b"bad \xff\xfe byte\n" + "猫\n".encode())
    (doc,) = read_text(path)
    assert doc.text == "ok\nbad \ufffd\ufffd byte\n猫"
    assert doc.num_bad_byte_lines == 1


def test_jsonl_reader_rejects_malformed_lines(tmp_path):
    path = write_lines(tmp_path / "w.jsonl", [
        json.dumps({"id": 7, "title": "猫", "url": "https://x/7", "text": "本文"}, ensure_ascii=False),
        '{"text": "broken',
        "[1, 2]",
        json.dumps({"body": "no text field"}),
    ])
    items = list(read_jsonl(path, "text"))
    assert (items[0].text, items[0].doc_id, items[0].title, items[0].url) == ("本文", "7", "猫", "https://x/7")
    assert [type(i) for i in items[1:]] == [Reject] * 3
    assert [i.where for i in items[1:]] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "malformed JSON" in items[1].reason


def test_docs_stage_logs_rejects_with_file_and_line(tmp_path):
    path = write_lines(tmp_path / "w.jsonl", ['{"text": "一つ目"}', "{oops", '{"text": "三つ目"}'])
    data = DataConfig(inputs=[{"path": str(path), "format": "jsonl"}], output_dir=str(tmp_path / "out"),
                      max_rejected_share=0.5)
    out = tmp_path / "docs"
    out.mkdir()
    manifest = docs_stage(data, out)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert manifest["totals"]["num_rejected"] == 1
    assert rejects == [{"input": 0, "unit": 0, "where": f"{path}:2", "reason": rejects[0]["reason"]}]
    # no id in the records: unit index and position in the unit
    assert [r["id"] for r in read_rows(out / "shard-00000.arrow")] == ["w:000000-0000000", "w:000000-0000001"]


# --- cleaning and filters --------------------------------------------------------------


def test_clean_text_nfkc_and_whitespace():
    assert clean_text("ｱｲｳ１２３") == "アイウ123"
    assert clean_text("　吾輩は  猫\t である。  \n\n   \n名前") == "吾輩は 猫 である。\n名前"


def test_dedup_and_min_chars_are_counted(tmp_path):
    lines = ["吾輩は猫である。", "", "短い", "", "吾輩は猫である。", "", "名前はまだ無い。", ""]
    path = write_lines(tmp_path / "d.txt", lines)
    data = DataConfig(inputs=[str(path)], output_dir=str(tmp_path), filters={"min_chars": 5})
    out = tmp_path / "docs"
    out.mkdir()
    manifest = docs_stage(data, out)
    totals = manifest["totals"]
    assert (totals["num_docs_in"], totals["num_docs_out"]) == (4, 2)
    assert totals["dropped"] == {"too_short": 1, "duplicate": 1, "near_duplicate": 0}
    assert manifest["inputs"][0]["dropped"] == totals["dropped"]
    assert [r["text"] for r in read_rows(out / "shard-00000.arrow")] == ["吾輩は猫である。", "名前はまだ無い。"]


# --- shards and manifest ---------------------------------------------------------------


def test_docs_shards_roll_over_and_load_with_datasets(tmp_path):
    lines = [line for i in range(60) for line in (f"文書{i}の一行目。" * 5, f"二行目{i}", "")]
    first = write_lines(tmp_path / "a.txt", lines[:90])
    write_lines(tmp_path / "b.txt", lines[90:])
    data = DataConfig(inputs=[str(tmp_path / "*.txt")], output_dir=str(tmp_path), shard_bytes=1000)
    out = tmp_path / "docs"
    out.mkdir()
    manifest = docs_stage(data, out)
    shards = manifest["shards"]
    assert len(shards) > 3
    texts = []
    for shard in shards:
        ds = datasets.Dataset.from_file(str(out / shard["file"]))
        assert ds.column_names[:5] == ["id", "source", "title", "url", "text"]
        assert len(ds) == shard["rows"]
        assert shard["bytes"] == (out / shard["file"]).stat().st_size
        assert shard["sha256"] == get_sha256(out / shard["file"])
        texts += ds["text"]
    totals = manifest["totals"]
    assert len(texts) == totals["num_docs_out"] == sum(s["rows"] for s in shards) == 60
    assert totals["text_bytes_out"] == sum(len(t.encode()) for t in texts)
    assert totals["num_docs_in"] == sum(i["num_docs_in"] for i in manifest["inputs"])
    assert manifest["inputs"][0]["sources"] == ["a", "b"]
    assert manifest["inputs"][0]["files"][0] == str(first)


# --- config ----------------------------------------------------------------------------


def test_config_coerces_plain_paths_and_finds_missing_globs(tmp_path):
    existing = write_lines(tmp_path / "x.txt", ["a"])
    missing = str(tmp_path / "nope" / "*.txt")
    data = DataConfig(inputs=[str(existing), {"path": missing, "format": "jsonl"}], output_dir=str(tmp_path))
    assert data.inputs[0] == InputSpec(path=str(existing))
    assert resolve_input_files(data.inputs[0]) == [existing]
    assert data.find_problems() == [("data.inputs[1].path", f"no file matches {missing!r}")]


@pytest.mark.parametrize("bad", [{"inputs": []}, {"unknown": 1}, {"pack_length": 1}, {"shard_bytes": 0}])
def test_config_rejects_bad_values(tmp_path, bad):
    fields = {"inputs": ["x.txt"], "output_dir": str(tmp_path), **bad}
    with pytest.raises(ValidationError):
        DataConfig(**fields)


def test_run_prep_reports_missing_inputs(tmp_path):
    data = DataConfig(inputs=[str(tmp_path / "missing.txt")], output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"data\.inputs\[0\]\.path: no file matches"):
        run_prep(data, TokenizerConfig(), PACK_LENGTH, log=lambda *_: None)
    assert not (tmp_path / "out").exists()


# --- run_prep end to end -----------------------------------------------------------------


def build_configs(corpus: Path, output_dir: Path) -> tuple[DataConfig, TokenizerConfig]:
    data = DataConfig(inputs=[str(corpus)], output_dir=str(output_dir), shard_bytes=64 * 1024)
    return data, TokenizerConfig(vocab_size=4000, num_sentinels=100)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """run_prep once on the first 3000 lines of neko.txt (~200 documents)."""
    root = tmp_path_factory.mktemp("prep")
    corpus = write_lines(root / "neko_head.txt", NEKO.read_text(encoding="utf-8").split("\n")[:3000])
    data, tok = build_configs(corpus, root / "out")
    summary = run_prep(data, tok, PACK_LENGTH, log=lambda *_: None)
    return corpus, root / "out", summary


def load_docs(out: Path) -> list[str]:
    return [row["text"] for shard in sorted(layout.docs_dir(out).glob("shard-*.arrow")) for row in read_rows(shard)]


def load_windows(out: Path) -> list[list[int]]:
    shards = sorted(layout.tokens_dir(out).glob("shard-*.arrow"))
    tables = [pa.ipc.open_stream(pa.memory_map(str(s))).read_all() for s in shards]
    ids = [t.column("input_ids").combine_chunks().values.to_numpy().reshape(-1, PACK_LENGTH) for t in tables]
    return [row.tolist() for block in ids for row in block]


def test_run_prep_writes_all_stages(prepared):
    _, out, summary = prepared
    assert {p.name for p in out.iterdir()} == {"docs", "tokenizer", "tokens"}
    for stage in ("docs", "tokenizer", "tokens"):
        assert (out / stage / "_SUCCESS").is_file() and not summary[stage]["skipped"]
    assert summary["docs"]["num_docs_out"] > 150
    assert summary["tokenizer"]["vocab_size"] == 4100
    tokens = read_manifest(layout.tokens_dir(out))
    assert tokens["eos_id"] == 1 and tokens["vocab_size"] == 4100 and tokens["pack_length"] == PACK_LENGTH
    assert len(tokens["shards"]) > 1


def test_token_windows_decode_to_input_documents(prepared):
    corpus, out, _ = prepared
    windows = load_windows(out)
    manifest = read_manifest(layout.tokens_dir(out))
    assert all(len(row) == PACK_LENGTH for row in windows)
    assert len(windows) == manifest["num_sequences"] == sum(s["rows"] for s in manifest["shards"])
    sp = spm.SentencePieceProcessor(model_file=str(layout.tokenizer_dir(out) / "spiece.model"))
    flat = [t for row in windows for t in row]
    total = sum(len(ids) + 1 for ids in sp.encode(load_docs(out)))
    assert total == len(flat) + manifest["dropped_tail_tokens"]
    # Everything between two EOS is one whole document and decodes back to its cleaned text,
    # except that SentencePiece's default normalizer (nmt_nfkc) turns "\n" into a space.
    segments = sp.decode(split_on(flat, 1)[1:-1])
    docs = {doc.replace("\n", " "): doc for doc in load_docs(out)}
    assert len(segments) > 50 and all(seg in docs for seg in segments)
    # ... and each of its lines is a line of the corpus, after the same normalisation.
    from data_prep.clean import build_normalizer
    from data_prep.config import CleanConfig

    raw = build_normalizer(CleanConfig())(corpus.read_text(encoding="utf-8"))
    lines = [line for seg in segments for line in docs[seg].split("\n")]
    assert sum(line in raw for line in lines) > 0.99 * len(lines)


def split_on(ids: list[int], sep: int) -> list[list[int]]:
    parts: list[list[int]] = [[]]
    for token in ids:
        if token == sep:
            parts.append([])
        else:
            parts[-1].append(token)
    return parts


def test_rerun_is_a_no_op(prepared):
    corpus, out, _ = prepared
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    data, tok = build_configs(corpus, out)
    summary = run_prep(data, tok, PACK_LENGTH, log=lambda *_: None)
    assert all(summary[stage]["skipped"] for stage in ("docs", "tokenizer", "tokens"))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_killed_stage_is_redone_cleanly(prepared, tmp_path):
    corpus, original, _ = prepared
    out = tmp_path / "out"
    shutil.copytree(original, out)
    shutil.rmtree(out / "tokens")
    (out / "tokens.tmp").mkdir()
    (out / "tokens.tmp" / "shard-00000.arrow").write_bytes(b"half written")
    data, tok = build_configs(corpus, out)
    summary = run_prep(data, tok, PACK_LENGTH, log=lambda *_: None)
    assert summary["docs"]["skipped"] and summary["tokenizer"]["skipped"] and not summary["tokens"]["skipped"]
    assert not (out / "tokens.tmp").exists()
    # Deterministic: the redone stage is byte-identical to the first build.
    assert read_manifest(out / "tokens") == read_manifest(original / "tokens")


def test_changed_pack_length_rebuilds_tokens(prepared, tmp_path):
    corpus, original, _ = prepared
    out = tmp_path / "out"
    shutil.copytree(original, out)
    data, tok = build_configs(corpus, out)
    summary = run_prep(data, tok, 64, log=lambda *_: None)
    assert summary["tokenizer"]["skipped"] and not summary["tokens"]["skipped"]
    assert read_manifest(out / "tokens")["pack_length"] == 64
