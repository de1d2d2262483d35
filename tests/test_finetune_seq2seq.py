"""finetune.seq2seq: the T5 token layout of text-to-text examples, batches, greedy generation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from data_prep.config import TokenizerConfig
from data_prep.tokenizer import export_hf_tokenizer, load_tokenizer, train_sentencepiece
from finetune import Example
from finetune.seq2seq import (IGNORE_INDEX, Seq2SeqLengths, generate_predictions, get_batch,
                              read_predictions, tokenize_examples, write_predictions)
from finetune.serving import LOGGED_INPUT_CHARS
from trainer.model import ModelConfig, build_model

NEKO = Path(__file__).resolve().parents[1] / "data_prep" / "samples" / "neko.txt"
NEKO_LINES = [line for line in NEKO.read_text(encoding="utf-8").split("\n")[:1500] if line.strip()]
PAD, EOS = 0, 1


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small T5-layout tokenizer trained as data prep does (2000 pieces: neko's kanji need more
    than 1000 at SentencePiece's lowest character coverage, 0.98)."""
    out = tmp_path_factory.mktemp("seq2seq-tokenizer")
    train_sentencepiece(NEKO_LINES, TokenizerConfig(vocab_size=2000, character_coverage=0.98), out / "spiece.model")
    export_hf_tokenizer(out / "spiece.model", 100, out)
    return load_tokenizer(out)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="t5-tiny"), len(tokenizer))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


EXAMPLES = [Example("a", "吾輩は猫である。", "0"), Example("b", "名前はまだ無い。", "8"),
            Example("c", NEKO_LINES[5], "sports-watch")]


def test_lengths_defaults_and_validation():
    lengths = Seq2SeqLengths()
    assert (lengths.input_length, lengths.target_length, lengths.overlong) == (512, 4, "truncate")
    for bad in ({"input_length": 1}, {"target_length": 0}, {"overlong": "drop"}, {"target_len": 4}):
        with pytest.raises(ValidationError):
            Seq2SeqLengths(**bad)


def test_t5_layout_eos_then_padding(tokenizer):
    tokenized = tokenize_examples(EXAMPLES[:2], tokenizer, Seq2SeqLengths(input_length=32, target_length=4))
    assert tokenized.input_ids.shape == (2, 32) and tokenized.labels.shape == (2, 4)
    assert tokenized.input_ids.dtype == np.int32 and tokenized.labels.dtype == np.int32
    assert tokenized.ids == ["a", "b"]
    for row, example in enumerate(EXAMPLES[:2]):
        source, target = encode(tokenizer, example.input) + [EOS], encode(tokenizer, example.target) + [EOS]
        assert tokenized.input_ids[row].tolist() == source + [PAD] * (32 - len(source))
        assert tokenized.labels[row].tolist() == target + [IGNORE_INDEX] * (4 - len(target))
        assert tokenized.input_lengths[row] == len(source)
    assert (tokenized.num_truncated_inputs, tokenized.num_truncated_targets, tokenized.report.num_skipped) == (0, 0, 0)


def get_fitting_input_length(tokenizer) -> int:
    """The input length that holds examples a and b (with EOS) but not c, neko's long line."""
    needed = [len(encode(tokenizer, e.input)) + 1 for e in EXAMPLES]
    assert needed[2] > max(needed[:2])
    return max(needed[:2])


def test_truncate_keeps_the_first_tokens_and_eos(tokenizer):
    input_length = get_fitting_input_length(tokenizer)
    tokenized = tokenize_examples(EXAMPLES, tokenizer, Seq2SeqLengths(input_length=input_length, target_length=3))
    long_input, long_target = encode(tokenizer, EXAMPLES[2].input), encode(tokenizer, EXAMPLES[2].target)
    assert len(long_target) > 2  # and "0", "8" fit in 3: one piece and "▁" at most, then EOS
    assert tokenized.input_ids[2].tolist() == long_input[:input_length - 1] + [EOS]
    assert tokenized.labels[2].tolist() == long_target[:2] + [EOS]
    assert tokenized.ids == ["a", "b", "c"] and tokenized.report.num_kept == 3
    assert (tokenized.num_truncated_inputs, tokenized.num_truncated_targets) == (1, 1)
    assert "1 input(s), 1 target(s)" in tokenized.summary()


def test_skip_leaves_out_and_reports_overlong_examples(tokenizer):
    input_length = get_fitting_input_length(tokenizer)
    lengths = Seq2SeqLengths(input_length=input_length, target_length=4, overlong="skip")
    tokenized = tokenize_examples(EXAMPLES, tokenizer, lengths)
    assert tokenized.ids == ["a", "b"] and len(tokenized) == 2 and tokenized.input_ids.shape == (2, input_length)
    assert (tokenized.num_truncated_inputs, tokenized.num_truncated_targets) == (0, 0)
    [(where, reason)] = tokenized.report.skipped
    assert where == "c" and f"more than input_length={input_length}" in reason
    assert "more than target_length=4" in reason  # "sports-watch" needs more than 3 tokens and EOS
    assert tokenized.report.num_kept == 2 and tokenized.num_skipped == 1


def test_get_batch_dtypes_shapes_and_mask(tokenizer, model):
    examples = [*EXAMPLES, Example("d", "<pad>と書いた猫", "1")]  # a literal <pad> inside the text is id 0
    tokenized = tokenize_examples(examples, tokenizer, Seq2SeqLengths(input_length=16, target_length=4))
    batch = get_batch(tokenized, [3, 0])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.int64 for t in batch.values())
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 16) and batch["labels"].shape == (2, 4)
    assert batch["input_ids"][0, 0] == PAD and batch["attention_mask"][0, 0] == 1
    assert batch["attention_mask"].sum(1).tolist() == [tokenized.input_lengths[3], tokenized.input_lengths[0]]
    assert math.isfinite(model(**batch).loss.item())  # the layout is the one transformers' T5 expects


def test_generation_gives_one_record_per_example_in_order(tokenizer, model):
    examples = [*EXAMPLES, Example("d", "x" * 500, "1"), Example("e", "どこで生れたか", "2")]
    model.train()
    records = generate_predictions(model, tokenizer, examples, batch_size=2, max_new_tokens=4, input_length=32)
    assert model.training  # given back in the mode it came in
    assert [r["id"] for r in records] == ["a", "b", "c", "d", "e"]
    assert [r["target"] for r in records] == [e.target for e in examples]
    assert all(r["error"] is None and isinstance(r["prediction"], str) and r["latency_ms"] > 0 for r in records)
    assert records[3]["input"] == "x" * LOGGED_INPUT_CHARS
    # The first batch's two records share its time: latency is amortised over the batch.
    assert records[0]["latency_ms"] == records[1]["latency_ms"]


class FailingSecondBatch:
    """The model, except that its second generate() call raises (an OOM, say)."""

    def __init__(self, model):
        self.model, self.num_calls = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, **kwargs):
        self.num_calls += 1
        if self.num_calls == 2:
            raise RuntimeError("injected failure")
        return self.model.generate(**kwargs)


def test_a_failed_batch_gives_error_records_and_the_rest_still_run(tokenizer, model):
    examples = [Example(str(i), line, "0") for i, line in enumerate(NEKO_LINES[:5])]
    records = generate_predictions(FailingSecondBatch(model), tokenizer, examples, batch_size=2,
                                   max_new_tokens=3, input_length=32)
    assert [r["id"] for r in records] == ["0", "1", "2", "3", "4"]
    assert [r["error"] for r in records] == [None, None, "RuntimeError: injected failure",
                                             "RuntimeError: injected failure", None]
    assert records[2]["prediction"] == records[3]["prediction"] == ""


def test_predictions_file_round_trips(tmp_path):
    records = [{"id": "a", "input": "吾輩は猫である。", "target": "0", "prediction": "0", "latency_ms": 1.5,
                "error": None},
               {"id": "b", "input": "名前", "target": "8", "prediction": "", "latency_ms": 2.0, "error": "boom"}]
    path = write_predictions(records, tmp_path / "eval" / "predictions.jsonl")
    assert read_predictions(path) == records
    assert "吾輩は猫である。" in path.read_text(encoding="utf-8")  # not \\u escapes
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b"]
    assert [p.name for p in path.parent.iterdir()] == ["predictions.jsonl"]  # no temporary file left
