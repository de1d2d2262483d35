"""data_prep.pack (tokenize + pack into windows) and the tokenizer's training-sample sources.

Docs shards are written by hand with pyarrow, as the docs stage lays them out, so these
tests need neither the docs stage nor transformers; a 1500-piece tokenizer trains in ~0.5 s.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import sentencepiece as spm

from data_prep import pack, tokenizer
from data_prep.config import TokenizerConfig
from data_prep.pack import iter_text_chunks, iter_utf8, pack_tokens
from data_prep.shards import get_sha256
from data_prep.tokenizer import EOS_ID, build_tokenizer, get_sample_sources, train_sentencepiece

NEKO = Path(__file__).resolve().parents[1] / "data_prep" / "samples" / "neko.txt"
DOC_COLUMNS = ("id", "source", "title", "url", "text")
PACK_LENGTH = 64
RARE_CHAR = "鱻"  # not in neko.txt


def neko_paragraphs(num_docs: int) -> list[str]:
    return [p for p in NEKO.read_text(encoding="utf-8").split("\n\n") if p.strip()][:num_docs]


def write_docs(docs_dir: Path, docs: list[tuple[str, str]], formats: dict[str, str] | None = None,
               shard_rows: int = 100, batch_rows: int = 30) -> Path:
    """(source, text) documents as docs shards of `shard_rows` in batches of `batch_rows`, plus a
    manifest with one input per source (format `formats[source]`, default jsonl)."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(name, pa.string()) for name in DOC_COLUMNS])
    for shard_index, start in enumerate(range(0, len(docs), shard_rows)):
        shard = docs[start : start + shard_rows]
        with pa.OSFile(str(docs_dir / f"shard-{shard_index:05d}.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, schema) as writer:
                for b in range(0, len(shard), batch_rows):
                    rows = shard[b : b + batch_rows]
                    columns = {
                        "id": [f"{s}:{start + b + i}" for i, (s, _) in enumerate(rows)], "source": [s for s, _ in rows],
                        "title": [""] * len(rows), "url": [""] * len(rows), "text": [t for _, t in rows],
                    }
                    writer.write_batch(pa.RecordBatch.from_pydict(columns, schema=schema))
    sources = sorted({source for source, _ in docs})
    inputs = [{"input": i, "format": (formats or {}).get(s, "jsonl"), "sources": [s]} for i, s in enumerate(sources)]
    (docs_dir / "manifest.json").write_text(json.dumps({"inputs": inputs}), encoding="utf-8")
    return docs_dir


def reference_pack(texts: list[str], sp: spm.SentencePieceProcessor, pack_length: int) -> tuple[np.ndarray, int]:
    """(windows, dropped tail tokens) the plain way: ids of each document, then EOS, cut in order."""
    stream: list[int] = []
    for text in texts:
        stream += sp.encode(text) + [EOS_ID]
    num_full = len(stream) // pack_length
    return np.array(stream[: num_full * pack_length], dtype=np.int32).reshape(-1, pack_length), len(stream) % pack_length


def read_windows(tokens_dir: Path, manifest: dict) -> np.ndarray:
    rows = []
    for shard in manifest["shards"]:
        table = pa.ipc.open_stream(pa.memory_map(str(tokens_dir / shard["file"]))).read_all()
        assert table.schema.field("input_ids").type == pa.list_(pa.int32(), manifest["pack_length"])
        assert table.num_rows == shard["rows"]
        assert get_sha256(tokens_dir / shard["file"]) == shard["sha256"]
        rows.append(table.column("input_ids").combine_chunks().values.to_numpy().reshape(-1, manifest["pack_length"]))
    return np.concatenate(rows)


@pytest.fixture(scope="module")
def spiece_path(tmp_path_factory) -> Path:
    lines = [line for line in NEKO.read_text(encoding="utf-8").split("\n")[:1500] if line.strip()]
    path = tmp_path_factory.mktemp("spiece") / "spiece.model"
    train_sentencepiece(lines, TokenizerConfig(vocab_size=1500, character_coverage=0.98), path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """~200 neko paragraphs in 2 docs shards, with an empty document and one rarer than the vocabulary."""
    texts = neko_paragraphs(200)
    texts[10:10] = ["", f"{RARE_CHAR}😀"]
    docs_dir = write_docs(tmp_path_factory.mktemp("corpus") / "docs", [("neko", t) for t in texts])
    return docs_dir, texts


def run_pack(docs_dir: Path, spiece_path: Path, out_dir: Path, shard_bytes: int = 2**30, **kwargs) -> dict:
    out_dir.mkdir(parents=True)
    return pack_tokens(docs_dir, spiece_path, PACK_LENGTH, out_dir, shard_bytes, vocab_size=1600, **kwargs)


def test_packing_equals_reference(corpus, spiece_path, tmp_path):
    docs_dir, texts = corpus
    manifest = run_pack(docs_dir, spiece_path, tmp_path / "tokens")
    sp = spm.SentencePieceProcessor(model_file=str(spiece_path))
    expected, tail = reference_pack(texts, sp, PACK_LENGTH)
    windows = read_windows(tmp_path / "tokens", manifest)
    np.testing.assert_array_equal(windows, expected)
    first = sp.encode(texts[0])
    assert windows.ravel()[: len(first) + 1].tolist() == first + [EOS_ID]
    assert manifest["num_sequences"] == len(expected) and manifest["num_tokens"] == expected.size
    assert manifest["dropped_tail_tokens"] == tail
    assert (manifest["eos_id"], manifest["vocab_size"], manifest["pack_length"]) == (EOS_ID, 1600, PACK_LENGTH)
    assert json.loads((tmp_path / "tokens" / "manifest.json").read_text()) == manifest


def test_small_encode_chunks_change_nothing(corpus, spiece_path, tmp_path, monkeypatch):
    """Chunks of ~1 KB: the carry crosses many chunk and batch boundaries."""
    docs_dir, _ = corpus
    whole = run_pack(docs_dir, spiece_path, tmp_path / "whole")
    monkeypatch.setattr(pack, "ENCODE_CHUNK_BYTES", 1000)
    chunked = run_pack(docs_dir, spiece_path, tmp_path / "chunked")
    np.testing.assert_array_equal(read_windows(tmp_path / "chunked", chunked), read_windows(tmp_path / "whole", whole))
    assert chunked["dropped_tail_tokens"] == whole["dropped_tail_tokens"]


def test_same_bytes_for_any_thread_count(corpus, spiece_path, tmp_path):
    docs_dir, _ = corpus
    one = run_pack(docs_dir, spiece_path, tmp_path / "one", num_threads=1)
    two = run_pack(docs_dir, spiece_path, tmp_path / "two", num_threads=2)
    assert one["shards"] == two["shards"]  # file names, rows, bytes and sha256


def test_shard_rollover(corpus, spiece_path, tmp_path):
    docs_dir, _ = corpus
    single = run_pack(docs_dir, spiece_path, tmp_path / "single")
    rolled = run_pack(docs_dir, spiece_path, tmp_path / "rolled", shard_bytes=20 * PACK_LENGTH * 4)
    assert len(single["shards"]) == 1 and len(rolled["shards"]) > 3
    assert [s["file"] for s in rolled["shards"]] == [f"shard-{i:05d}.arrow" for i in range(len(rolled["shards"]))]
    assert sum(s["rows"] for s in rolled["shards"]) == rolled["num_sequences"] == single["num_sequences"]
    np.testing.assert_array_equal(read_windows(tmp_path / "rolled", rolled), read_windows(tmp_path / "single", single))


def test_corpus_shorter_than_a_window(spiece_path, tmp_path):
    docs_dir = write_docs(tmp_path / "docs", [("a", "吾輩は猫である。")])
    manifest = run_pack(docs_dir, spiece_path, tmp_path / "tokens")
    assert manifest["num_sequences"] == 0 and manifest["shards"] == []
    assert manifest["dropped_tail_tokens"] == len(spm.SentencePieceProcessor(model_file=str(spiece_path)).encode("吾輩は猫である。")) + 1


def test_text_chunks_keep_order_and_size(corpus):
    docs_dir, texts = corpus
    chunks = list(iter_text_chunks(docs_dir, 5000))
    assert [t.decode() for chunk in chunks for t in chunk] == texts
    for chunk in chunks[:-1]:  # each closes at the first document that reaches the target
        assert sum(map(len, chunk)) >= 5000 > sum(map(len, chunk[:-1]))


@pytest.mark.parametrize("type_", [pa.string(), pa.large_string()])
def test_utf8_of_sliced_arrays(type_):
    texts = ["吾輩", "", "猫😀", "である", "x"]
    array = pa.array(texts, type=type_).slice(1, 3)
    assert list(iter_utf8(array)) == [t.encode() for t in texts[1:4]]


# --- tokenizer training sample: tokenizer.sample_sources ---------------------------------


@pytest.fixture()
def two_sources(tmp_path) -> Path:
    """'neko' (neko.txt) and 'fish', whose lines are full of a character neko never uses."""
    fish = [f"{RARE_CHAR}{RARE_CHAR}の{RARE_CHAR}は魚である。{i}" for i in range(100)]
    docs = [("neko", t) for t in neko_paragraphs(200)] + [("fish", t) for t in fish]
    return write_docs(tmp_path / "docs", docs, shard_rows=120)


def train_from_docs(docs_dir: Path, out_dir: Path, monkeypatch, **cfg) -> tuple[spm.SentencePieceProcessor, list[str]]:
    """build_tokenizer's training path; the Hugging Face export (transformers) is not what this tests."""
    monkeypatch.setattr(tokenizer, "export_hf_tokenizer", lambda *args: None)
    monkeypatch.setattr(tokenizer, "write_tokenizer_manifest", lambda *args: {})
    out_dir.mkdir()
    logged: list[str] = []
    build_tokenizer(docs_dir, TokenizerConfig(vocab_size=2000, character_coverage=0.98, **cfg), out_dir, logged.append)
    return spm.SentencePieceProcessor(model_file=str(out_dir / "spiece.model")), logged


def is_byte_fallback(sp: spm.SentencePieceProcessor, text: str) -> bool:
    return all(sp.is_byte(i) for i in sp.encode(text)[-3:])  # a 3-byte UTF-8 character


def test_sample_sources_limit_the_training_sample(two_sources, tmp_path, monkeypatch):
    sp, logged = train_from_docs(two_sources, tmp_path / "neko_only", monkeypatch, sample_sources=["neko"])
    assert is_byte_fallback(sp, RARE_CHAR)
    assert "sampled from sources neko" in logged[-1]
    sp_all, logged = train_from_docs(two_sources, tmp_path / "all", monkeypatch)
    assert not is_byte_fallback(sp_all, RARE_CHAR)
    assert "sampled from all sources" in logged[-1]


def test_default_sample_sources_are_the_wikipedia_inputs(tmp_path):
    docs = [("wiki", "a"), ("web", "b"), ("extracted", "c")]
    formats = {"wiki": "wikipedia_xml", "extracted": "wikiextractor", "web": "jsonl"}
    assert get_sample_sources(write_docs(tmp_path / "wiki", docs, formats), None) == ["extracted", "wiki"]
    assert get_sample_sources(write_docs(tmp_path / "none", docs[1:2]), None) is None  # no Wikipedia input: all
    mixed = write_docs(tmp_path / "mixed", docs[:2], {"wiki": "wikipedia_xml,text"})
    assert get_sample_sources(mixed, None) is None
    assert get_sample_sources(mixed, ["web", "web"]) == ["web"]


def test_unknown_sample_source_lists_the_available_ones(two_sources):
    with pytest.raises(ValueError, match=r"unknown source\(s\) \['wiki'\]; the docs stage has \['fish', 'neko'\]"):
        get_sample_sources(two_sources, ["neko", "wiki"])


# --- units packed during the docs merge (pipeline.packing_alongside) -------------------


def write_encoded_unit(unit_dir: Path, docs: list[list[int]]) -> None:
    """A unit as a docs worker leaves it with a tokenizer: ids + EOS per document, and their lengths."""
    unit_dir.mkdir(parents=True)
    ids = [np.array([*doc, EOS_ID], dtype=np.int32) for doc in docs]
    np.concatenate([np.zeros(0, dtype=np.int32), *ids]).tofile(unit_dir / "tokens.bin")
    np.array([len(i) for i in ids], dtype=np.int32).tofile(unit_dir / "lengths.bin")


@pytest.fixture
def encoded_units(tmp_path) -> tuple[list[Path], list[np.ndarray]]:
    """Three units (one empty) and the merge's keep masks of them."""
    rng = np.random.default_rng(0)
    units, keep = [], []
    for u, num_docs in enumerate((5, 0, 8)):
        units.append(tmp_path / f"u-{u:06d}")
        write_encoded_unit(units[-1], [rng.integers(3, 1000, rng.integers(0, 40)).tolist() for _ in range(num_docs)])
        keep.append(np.array([d % 3 != 1 for d in range(num_docs)], dtype=bool))
    return units, keep


def test_the_keep_file_is_cut_per_unit(encoded_units, tmp_path):
    units, keep = encoded_units
    np.save(tmp_path / "keep.npy", np.concatenate(keep))
    assert [k.tolist() for k in pack.load_unit_keep(tmp_path / "keep.npy", units)] == [k.tolist() for k in keep]
    np.save(tmp_path / "short.npy", np.concatenate(keep)[:-1])
    with pytest.raises(ValueError, match="12 documents in the keep mask but 13 encoded"):
        pack.load_unit_keep(tmp_path / "short.npy", units)


def test_prepacked_windows_are_adopted_only_with_the_same_settings(encoded_units, tmp_path):
    units, keep = encoded_units
    expected_dir, adopted_dir = tmp_path / "expected", tmp_path / "adopted"
    expected_dir.mkdir()
    adopted_dir.mkdir()
    expected = pack.pack_unit_tokens(units, keep, 16, expected_dir, 400, 2100)
    packed = tmp_path / "work" / pack.PREPACKED_DIR
    pack.prepack_units(units, keep, 16, 400, packed)
    assert not packed.with_name(packed.name + ".tmp").exists()
    assert pack.adopt_prepacked(packed, 32, 400, 2100, adopted_dir) is None  # another window length
    assert pack.adopt_prepacked(packed, 16, 999, 2100, adopted_dir) is None  # another shard size
    assert not list(adopted_dir.iterdir())
    assert pack.adopt_prepacked(packed, 16, 400, 2100, adopted_dir) == expected
    assert len(expected["shards"]) > 1 and expected["num_sequences"] > 0
    for shard in expected["shards"]:
        assert (adopted_dir / shard["file"]).read_bytes() == (expected_dir / shard["file"]).read_bytes()
    assert json.loads((adopted_dir / "manifest.json").read_text()) == expected


def test_nothing_is_adopted_from_a_killed_prepack(encoded_units, tmp_path):
    packed = tmp_path / "work" / pack.PREPACKED_DIR
    pack.prepack_units(*encoded_units, 16, 400, packed)
    packed.rename(packed.with_name(packed.name + ".tmp"))  # as if killed before the rename
    assert pack.adopt_prepacked(packed, 16, 400, 2100, tmp_path) is None
    pack.prepack_units(*encoded_units, 16, 400, packed)  # a rerun clears the leftover
    assert packed.is_dir() and not packed.with_name(packed.name + ".tmp").exists()
