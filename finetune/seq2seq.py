"""Text-to-text examples as fixed-size token arrays for a T5 encoder-decoder, and evaluation by
greedy generation in batches.

Token layout (T5, as data prep's tokenizer: pad 0, eos 1): an input is its tokens, then EOS,
then pad 0 up to `input_length`; a label row is the target's tokens, then EOS, then -100 up to
`target_length`. -100 is the index torch's cross entropy ignores, so padding adds no loss;
transformers' T5 turns it back into pad when it shifts the labels into decoder inputs.

Texts are encoded without the tokenizer's special tokens and the EOS is appended here, so the
layout is the same whatever post-processor the tokenizer carries, and a truncated sequence
still ends with EOS (its first `length - 1` tokens are kept, as T5's own truncation does).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from finetune import Example, ReadReport
from finetune.serving import predict_in_batches

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # labels ignored by torch's cross entropy (and transformers' seq2seq loss)


class Seq2SeqLengths(BaseModel):
    """Token lengths of encoder inputs and decoder targets, and what to do with longer texts."""

    model_config = ConfigDict(extra="forbid")

    # Defaults: the livedoor reference recipe (sonoisa/t5-base-japanese), inputs 512 / targets 4.
    input_length: int = Field(512, ge=2, description="encoder tokens per example, EOS included (room for one "
                                                     "token and EOS at least)")
    target_length: int = Field(4, ge=2, description="decoder label tokens per example, EOS included")
    overlong: Literal["truncate", "skip"] = Field(
        "truncate", description="an input or target longer than its length: keep its first tokens (and EOS), or "
                                "leave the example out; both are counted")


@dataclass
class EncodedTexts:
    """Texts as a padded id array with their true lengths (EOS included) before truncation."""

    ids: np.ndarray  # [N, length] int32, padded with `pad_value`
    lengths: np.ndarray  # [N] tokens kept, EOS included
    full_lengths: np.ndarray  # [N] tokens the text needs, EOS included (> length: truncated)


@dataclass
class TokenizedExamples:
    """Examples as model-ready arrays, row i being example `ids[i]`."""

    input_ids: np.ndarray  # [N, input_length] int32, pad 0
    input_lengths: np.ndarray  # [N] real input tokens (EOS included): the attention mask
    labels: np.ndarray  # [N, target_length] int32, target + EOS, then IGNORE_INDEX
    ids: list[str]
    num_truncated_inputs: int
    num_truncated_targets: int
    report: ReadReport  # kept count, and the examples skipped (by id) with the reason

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_skipped(self) -> int:
        return self.report.num_skipped

    def summary(self) -> str:
        return (f"{self.report.summary()}\n  truncated: {self.num_truncated_inputs} input(s), "
                f"{self.num_truncated_targets} target(s)")


def get_special_ids(tokenizer) -> tuple[int, int]:
    """(pad id, eos id) of a Hugging Face tokenizer; ValueError if it has either missing."""
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad_id is None or eos_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} needs a pad and an eos token for T5 "
                         f"(pad_token_id={pad_id}, eos_token_id={eos_id})")
    return pad_id, eos_id


def encode_texts(tokenizer, texts: Sequence[str], length: int, pad_value: int) -> EncodedTexts:
    """Encode in one batch call (the fast tokenizer's Rust batch path), append EOS, cut each row
    to `length` tokens (its first `length - 1` and EOS) and pad with `pad_value`."""
    _, eos_id = get_special_ids(tokenizer)
    # verbose=False: no "sequence longer than model_max_length" warning; the cut is made below.
    pieces = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    ids = np.full((len(pieces), length), pad_value, dtype=np.int32)
    lengths = np.zeros(len(pieces), dtype=np.int64)
    full_lengths = np.zeros(len(pieces), dtype=np.int64)
    for row, tokens in enumerate(pieces):
        kept = tokens[:length - 1]
        ids[row, :len(kept)] = kept
        ids[row, len(kept)] = eos_id
        lengths[row], full_lengths[row] = len(kept) + 1, len(tokens) + 1
    return EncodedTexts(ids, lengths, full_lengths)


def tokenize_examples(examples: Sequence[Example], tokenizer, lengths: Seq2SeqLengths) -> TokenizedExamples:
    """Inputs and targets of the examples in the T5 layout (see the module docstring).

    With overlong="skip" an example whose input or target does not fit is left out and listed
    in the report with its id and token counts; with "truncate" it is kept and counted.
    """
    pad_id, _ = get_special_ids(tokenizer)
    inputs = encode_texts(tokenizer, [e.input for e in examples], lengths.input_length, pad_id)
    targets = encode_texts(tokenizer, [e.target for e in examples], lengths.target_length, IGNORE_INDEX)
    inputs_over = inputs.full_lengths > lengths.input_length
    targets_over = targets.full_lengths > lengths.target_length
    report = ReadReport(f"tokenize (input_length={lengths.input_length}, target_length={lengths.target_length}, "
                        f"overlong={lengths.overlong})")
    keep = np.ones(len(examples), dtype=bool)
    if lengths.overlong == "skip":
        keep = ~(inputs_over | targets_over)
        for row in np.flatnonzero(~keep):
            report.skip(examples[row].id, _overlong_reason(inputs, targets, row, lengths))
    report.num_kept = int(keep.sum())
    return TokenizedExamples(
        input_ids=inputs.ids[keep], input_lengths=inputs.lengths[keep], labels=targets.ids[keep],
        ids=[e.id for e, kept in zip(examples, keep) if kept],
        num_truncated_inputs=int((inputs_over & keep).sum()), num_truncated_targets=int((targets_over & keep).sum()),
        report=report,
    )


def _overlong_reason(inputs: EncodedTexts, targets: EncodedTexts, row: int, lengths: Seq2SeqLengths) -> str:
    parts = [f"{name} needs {encoded.full_lengths[row]} tokens with EOS, more than {name}_length={limit}"
             for name, encoded, limit in (("input", inputs, lengths.input_length),
                                          ("target", targets, lengths.target_length))
             if encoded.full_lengths[row] > limit]
    return "; ".join(parts)


def get_attention_mask(lengths: np.ndarray, width: int) -> np.ndarray:
    """1 on the first `lengths[i]` positions of row i, 0 on the padding."""
    return (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)


def get_batch(tokenized: TokenizedExamples, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
    """{"input_ids", "attention_mask", "labels"} int64 tensors of the rows `indices`: the span
    corruption collator's batch plus the mask (inputs here have padding; packed windows had none).

    The mask comes from the stored lengths, not from `input_ids != 0`: a text that contains the
    literal "<pad>" encodes to id 0 inside the sequence and must still be attended to.
    """
    import torch

    indices = np.asarray(indices, dtype=np.int64)
    input_ids = tokenized.input_ids[indices].astype(np.int64)
    mask = get_attention_mask(tokenized.input_lengths[indices], input_ids.shape[1])
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(tokenized.labels[indices].astype(np.int64))}


# --- generation -----------------------------------------------------------------------------

def _get_device(model) -> torch.device:
    import torch

    device = getattr(model, "device", None)
    return device if device is not None else torch.device("cpu")


def _generate_texts(model, tokenizer, texts: list[str], max_new_tokens: int, input_length: int) -> list[str]:
    """Greedy outputs of one batch; inputs truncated exactly as `tokenize_examples` does."""
    import torch

    pad_id, _ = get_special_ids(tokenizer)
    encoded = encode_texts(tokenizer, texts, input_length, pad_id)
    # Cut the padding every row has: T5's positions are relative, so the result is the same.
    width = int(encoded.lengths.max())
    device = _get_device(model)
    input_ids = torch.from_numpy(encoded.ids[:, :width].astype(np.int64)).to(device)
    mask = torch.from_numpy(get_attention_mask(encoded.lengths, width)).to(device)
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                num_beams=1, do_sample=False)
    # .cpu() waits for the device: the batch's time below includes all of the generation.
    return tokenizer.batch_decode(output.cpu(), skip_special_tokens=True)


def generate_predictions(model, tokenizer, examples: Sequence[Example], batch_size: int, max_new_tokens: int,
                         input_length: int) -> list[dict]:
    """One record per example, in order, by greedy decoding (num_beams=1, no sampling): see
    `finetune.serving.predict_in_batches` for the record, its latency and a batch that fails.

    `model`: a transformers seq2seq model (for a DeepSpeed engine, its `.module`); it is put in
    eval mode for the generation and given back in the mode it came in.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be positive")

    def generate(batch: Sequence[Example]) -> list[str]:
        return _generate_texts(model, tokenizer, [e.input for e in batch], max_new_tokens, input_length)

    return predict_in_batches(model, examples, batch_size, generate)


def write_predictions(records: Sequence[dict], path: str | Path) -> Path:
    """JSON lines (UTF-8, Japanese as is), written to a temporary file then renamed: a reader never
    sees a half-written file, and an interrupted write leaves the previous one whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if the write failed
    return path


def read_predictions(path: str | Path) -> list[dict]:
    """The records `write_predictions` wrote, in order."""
    with Path(path).open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]
