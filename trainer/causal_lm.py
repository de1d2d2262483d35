"""The causal_lm objective: chat supervised fine-tuning of a decoder-only LM (the gemma-* presets)
on a chat task's conversations (`task:` section: chat JSON lines or the livedoor SFT set), and
its evaluation by the mean token loss on the task's evaluation split after the last step.

Training data: the task's train split in Gemma's turn format, tokenised and cut into windows of
`objective.max_length` tokens once on every rank (finetune.chat: the labels are the token on the
model's turns and -100 elsewhere), served in the order of trainer.data.SampleOrder, so resume and
world-size changes keep the batches of an uninterrupted run, as with the other objectives.

Packing (`objective.pack`) keeps attention inside each conversation. A batch carries
`position_ids` that restart at 0 for each conversation and *no* attention_mask: from those,
transformers builds a block-diagonal causal mask for whichever attention implementation runs
(eager, sdpa, flash-attention; masking_utils.find_packed_sequence_indices). It does so only when
no attention_mask and no KV cache is passed, hence `use_cache=False` in the batch (Gemma's config
says use_cache=True, which builds a cache even in training). Padding at a window's end has
position 0 at every token, so each padding token is a sequence of its own: no real token attends
to one, and its label is -100.

Evaluation runs on rank 0 from the exported model (RUN_DIR/export), as seq2seq's does
(trainer/seq2seq.py says why not the engine).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Literal, Sequence

import numpy as np
from pydantic import Field

from finetune.chat import IGNORE_INDEX, ChatWindowsConfig, Windows, build_windows, get_pad_id, tokenize_chat
from finetune.tasks import ChatTaskData, EvalResult
from trainer.data import SampleOrder
from trainer.distributed import gather_shards, get_shard

log = logging.getLogger("trainer.causal_lm")


class CausalLMConfig(ChatWindowsConfig):
    """Chat SFT of a causal LM (gemma-* presets) on the `task:` conversations, loss on the model's turns."""

    name: Literal["causal_lm"] = Field(description="Objective name; selects this objective.")


def tokenize_windows(conversations, tokenizer, cfg: ChatWindowsConfig) -> Windows:
    """Conversations -> packed (or one-per-window) training windows with their labels."""
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    examples = [tokenize_chat(messages, encode, tokenizer.bos_token_id) for messages in conversations]
    pad_id = get_pad_id(tokenizer)
    return build_windows(examples, cfg.max_length, pad_id, cfg.pack, cfg.overlong)


def get_window_batch(windows: Windows, rows: np.ndarray) -> dict:
    """The HF causal-LM forward's arguments for these windows (the module docstring says why
    there is no attention_mask and why use_cache is False)."""
    import torch

    return {"input_ids": torch.from_numpy(windows.input_ids[rows]),
            "position_ids": torch.from_numpy(windows.position_ids[rows]),
            "labels": torch.from_numpy(windows.labels[rows]),
            "use_cache": False}


def describe_windows(name: str, windows: Windows) -> str:
    counts = windows.counts
    return (f"{name}: {counts['num_examples']} conversations in {counts['num_windows']} windows "
            f"({counts['fill']:.0%} filled), {counts['num_trained_tokens']} trained tokens of "
            f"{counts['num_tokens']}; overlong: {counts['num_dropped_overlong']} dropped, "
            f"{counts['num_truncated_overlong']} truncated")


class CausalLMData:
    """The task's training windows, read in SampleOrder, and the evaluation windows."""

    def __init__(self, task: ChatTaskData, tokenizer, cfg: CausalLMConfig, seed: int):
        self.task = task
        self.cfg = cfg
        self.windows = tokenize_windows(task.splits["train"], tokenizer, cfg)
        self.eval_windows = {split: tokenize_windows(conversations, tokenizer, cfg)
                             for split, conversations in task.splits.items() if split != "train"}
        if not len(self.windows.input_ids):
            raise ValueError(f"no training window left:\n{self.summary()}")
        self.order = SampleOrder(len(self.windows.input_ids), seed)
        self.num_samples = len(self.windows.input_ids)
        self.tokens_per_sample = cfg.max_length  # window tokens, padding included

    def get_batch(self, global_indices: np.ndarray) -> dict:
        return get_window_batch(self.windows, self.order.windows(global_indices))

    def flops_per_sample(self, model_config) -> float:
        from trainer.flops import decoder_flops_per_sample

        return decoder_flops_per_sample(model_config, self.cfg.max_length)

    def summary(self) -> str:
        lines = [self.task.summary(), describe_windows("train", self.windows)]
        lines += [describe_windows(split, windows) for split, windows in self.eval_windows.items()]
        return "\n".join(lines)

    def evaluate(self, model, cfg, run_dir) -> EvalResult | None:
        """Collective: eval/loss on the split `cfg.split` (trainer.config.EvalConfig), each rank
        summing its shard of the windows; the result on rank 0, None on the others and if the
        task has no such split."""
        windows = self.eval_windows.get(cfg.split)
        if windows is None or not len(windows.input_ids):
            log.info("no evaluation: the task has no %s split (a chat task has one with task.eval_file)", cfg.split)
            return None
        start = time.perf_counter()
        rows = get_shard(len(windows.input_ids))
        log.info("evaluation: the loss of %d of the %d windows of split %s", len(rows), len(windows.input_ids), cfg.split)
        shard = gather_shards([get_loss_sum(model, windows, cfg.batch_size, rows)])
        if shard is None:
            return None
        loss_sum, num_tokens = sum(loss for loss, _ in shard), sum(count for _, count in shard)
        metrics = {**get_loss_metrics(loss_sum, num_tokens, len(windows.input_ids)), "eval_s": time.perf_counter() - start}
        return EvalResult(metrics, describe_windows(cfg.split, windows) + f"\nmean token loss {metrics['loss']:.4f}")


def get_loss_metrics(loss_sum: float, num_tokens: int, num_windows: int) -> dict[str, float]:
    """The evaluation's loss figures (training-time and `t5ja eval`): the mean token loss over the
    trained tokens of the windows, its perplexity, and what it was taken over."""
    loss = loss_sum / num_tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "num_windows": num_windows, "num_trained_tokens": num_tokens}


def get_loss_sum(model, windows: Windows, batch_size: int, rows: Sequence[int] | None = None) -> tuple[float, int]:
    """Summed next-token cross entropy over the trained tokens of every window (or of `rows`),
    and their count: sums, so that shards add up to the mean over all tokens, not a mean of
    per-batch means."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    rows = np.arange(len(windows.input_ids)) if rows is None else np.asarray(rows, dtype=np.int64)
    loss_sum, num_tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = get_window_batch(windows, rows[start:start + batch_size])
        labels = batch.pop("labels").to(device)
        with torch.no_grad():
            logits = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).logits
        # Token t predicts token t+1, as transformers' causal-LM loss shifts them.
        targets = labels[:, 1:]
        loss_sum += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                    ignore_index=IGNORE_INDEX, reduction="sum").item()
        num_tokens += int((targets != IGNORE_INDEX).sum())
    return loss_sum, num_tokens
