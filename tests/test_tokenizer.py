"""data_prep.tokenizer: SentencePiece training and the Hugging Face export in the T5 id layout."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer, T5TokenizerFast

from data_prep import tokenizer as tokenizer_module
from data_prep.config import TokenizerConfig
from data_prep.tokenizer import (
    TokenizerCheck,
    build_tokenizer,
    export_hf_tokenizer,
    inspect_tokenizer,
    load_tokenizer,
    sample_lines,
    train_sentencepiece,
    write_tokenizer_manifest,
)

NEKO = Path(__file__).resolve().parents[1] / "data_prep" / "samples" / "neko.txt"
NUM_PIECES, NUM_SENTINELS = 4000, 100
SAMPLES = [
    "吾輩は猫である。名前はまだ無い。",
    "どこで生れたかとんと見当がつかぬ。",
    "Hello, 世界! 123 ＡＢＣ",
    "𠮷野家で牛丼を食べた😀",
]


def neko_lines(num_lines: int = 3000) -> list[str]:
    return [line for line in NEKO.read_text(encoding="utf-8").split("\n")[:num_lines] if line.strip()]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """Train once per module: 4000 pieces on ~2700 lines of neko.txt (about a second)."""
    out = tmp_path_factory.mktemp("tokenizer")
    cfg = TokenizerConfig(vocab_size=NUM_PIECES, num_sentinels=NUM_SENTINELS)
    train_sentencepiece(neko_lines(), cfg, out / "spiece.model")
    export_hf_tokenizer(out / "spiece.model", NUM_SENTINELS, out)
    write_tokenizer_manifest(out, NUM_SENTINELS)
    return out


@pytest.mark.parametrize("load", [AutoTokenizer.from_pretrained, T5TokenizerFast.from_pretrained])
def test_t5_id_layout(tok_dir, load):
    tok = load(str(tok_dir))
    assert len(tok) == NUM_PIECES + NUM_SENTINELS
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.bos_token_id is None
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1
    assert tok.convert_tokens_to_ids("<extra_id_99>") == len(tok) - 100
    ids = tok("吾輩は猫である。").input_ids
    assert ids[-1] == 1 and ids.count(1) == 1


def test_manifest(tok_dir):
    manifest = json.loads((tok_dir / "manifest.json").read_text())
    assert manifest["vocab_size"] == NUM_PIECES + NUM_SENTINELS
    assert (manifest["num_pieces"], manifest["num_sentinels"]) == (NUM_PIECES, NUM_SENTINELS)
    assert (manifest["pad_id"], manifest["eos_id"], manifest["unk_id"]) == (0, 1, 2)
    assert json.loads((tok_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"


def test_hf_ids_equal_sentencepiece_ids(tok_dir):
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "spiece.model"))
    tok = load_tokenizer(tok_dir)
    for line in SAMPLES + neko_lines(3100)[-50:]:
        assert tok(line).input_ids == sp.encode(line) + [1], line


@pytest.mark.parametrize("text", ["𠮷", "😀", "𠮷野家😀です"])
def test_byte_fallback_round_trips(tok_dir, text):
    tok = load_tokenizer(tok_dir)
    ids = tok(text).input_ids
    assert 2 not in ids  # never unk: rare characters become UTF-8 byte pieces
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_sentinels_are_single_tokens(tok_dir):
    tok = load_tokenizer(tok_dir)
    ids = tok("吾輩は<extra_id_0>である<extra_id_1>").input_ids
    assert len(tok) - 1 in ids and len(tok) - 2 in ids


def test_vocab_too_small_is_a_clear_error(tmp_path):
    cfg = TokenizerConfig(vocab_size=300)
    with pytest.raises(ValueError, match=r"tokenizer\.vocab_size=300 .*Raise tokenizer\.vocab_size"):
        train_sentencepiece(neko_lines(), cfg, tmp_path / "spiece.model")


def test_sample_lines_is_deterministic_and_bounded():
    lines = [f"line {i}" for i in range(1000)]
    first = sample_lines(iter(lines), 100, seed=3)
    assert first == sample_lines(iter(lines), 100, seed=3) and len(set(first)) == 100
    assert first != sample_lines(iter(lines), 100, seed=4)
    assert sample_lines(iter(lines[:10]), 100, seed=0) == lines[:10]


def test_existing_tokenizer_path_is_copied_and_validated(tok_dir, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    manifest = build_tokenizer(tmp_path, TokenizerConfig(path=str(tok_dir), num_sentinels=NUM_SENTINELS), out)
    assert manifest == json.loads((tok_dir / "manifest.json").read_text())
    with pytest.raises(ValueError, match="expected 4000 pieces"):
        build_tokenizer(tmp_path, TokenizerConfig(path=str(tok_dir), num_sentinels=10), tmp_path / "bad")


@pytest.fixture
def unvouched_tok_dir(tok_dir, tmp_path) -> Path:
    """tok_dir without its manifest: nothing vouches for its files."""
    out = tmp_path / "unvouched"
    shutil.copytree(tok_dir, out, ignore=shutil.ignore_patterns("manifest.json"))
    return out


def test_check_run_ahead_is_reused_only_for_the_same_files(tok_dir, unvouched_tok_dir, tmp_path, monkeypatch):
    """The pipeline checks tokenizer.path in another process while the docs workers run; the
    stage reuses that check for the copied files, and checks again if they are not the ones
    checked."""
    built_manifest = json.loads((tok_dir / "manifest.json").read_text())
    tok_dir = unvouched_tok_dir
    check = TokenizerCheck(tok_dir).start()
    pid = check.pid
    checked = check.result()
    assert (checked["num_pieces"], checked["vocab_size"]) == (NUM_PIECES, NUM_PIECES + NUM_SENTINELS)
    assert check.result() == checked  # kept once read
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped: no zombie left behind
    cfg = TokenizerConfig(path=str(tok_dir), num_sentinels=NUM_SENTINELS)
    out = tmp_path / "copy"
    out.mkdir()
    with monkeypatch.context() as patch:  # reused: not inspected again
        patch.setattr(tokenizer_module, "inspect_tokenizer", lambda *a: pytest.fail("checked again"))
        assert build_tokenizer(tmp_path, cfg, out, checked=checked) == built_manifest
    stale = {**checked, "files": {name: "0" * 64 for name in checked["files"]}, "vocab_size": 1}
    again = tmp_path / "again"
    again.mkdir()
    assert build_tokenizer(tmp_path, cfg, again, checked=stale)["vocab_size"] == NUM_PIECES + NUM_SENTINELS
    # fails quietly: the stage checks again and raises there
    assert TokenizerCheck(tmp_path / "missing").start().result() is None
    with TokenizerCheck(tok_dir) as unread:  # result never asked for (the stage was done already)
        pid = unread.pid
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def test_a_built_tokenizers_manifest_vouches_for_its_files(tok_dir, unvouched_tok_dir):
    """A directory with the manifest a tokenizer stage wrote needs no check process while its
    files are the ones the manifest's sha256 name; a changed file or an older manifest does."""
    with TokenizerCheck(tok_dir) as check:
        assert check.pid is None
        assert check.result() == inspect_tokenizer(tok_dir)
    vouched = unvouched_tok_dir
    write_tokenizer_manifest(vouched, NUM_SENTINELS)
    with TokenizerCheck(vouched) as check:
        assert check.pid is None
    with open(vouched / "tokenizer.json", "a") as f:
        f.write("\n")  # same tokenizer, other bytes
    with TokenizerCheck(vouched) as check:
        assert check.pid is not None and check.result() == inspect_tokenizer(vouched)
    manifest = json.loads((tok_dir / "manifest.json").read_text())
    del manifest["files"]  # written before the manifest recorded them
    (vouched / "manifest.json").write_text(json.dumps(manifest))
    (vouched / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    with TokenizerCheck(vouched) as check:
        assert check.pid is not None


def test_vocab_too_large_for_corpus_is_a_clear_error(tmp_path):
    cfg = TokenizerConfig(vocab_size=1000)
    with pytest.raises(ValueError, match=r"tokenizer\.vocab_size=1000 is too large"):
        train_sentencepiece(["吾輩は猫である"] * 20, cfg, tmp_path / "spiece.model")
