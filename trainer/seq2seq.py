"""The seq2seq objective: supervised text-to-text fine-tuning of a T5 on a task's examples
(`task:` section, finetune.tasks), and its evaluation by greedy generation after the last step.

Training data: the task's train split, tokenized once (finetune.seq2seq.tokenize_examples) on
every rank (the same files read the same way: the same arrays), served in the order of
trainer.data.SampleOrder, so resume and world-size changes keep the batches of an
uninterrupted run, as with span corruption.

Evaluation runs on the exported Hugging Face model (RUN_DIR/export), not the engine: under
ZeRO-3 every rank would have to join every decoder step of every rank's generation
(transformers' `synced_gpus`), and an exception in one rank's batch would hang the others. The
exported model is the artifact users get, so scoring it is also the honest figure. Every rank
loads it and generates for its shard of the split (trainer.distributed.get_shard); rank 0
gathers the predictions in the split's order, scores them and writes the files.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from finetune.seq2seq import Seq2SeqLengths, generate_predictions, get_batch, tokenize_examples, write_predictions
from finetune.tasks import EvalResult, TaskData
from trainer.data import SampleOrder
from trainer.distributed import gather_shards, get_shard
from trainer.flops import t5_flops_per_sample

if TYPE_CHECKING:
    from trainer.config import EvalConfig

log = logging.getLogger("trainer.seq2seq")


class Seq2SeqConfig(Seq2SeqLengths):
    """Seq2seq fine-tuning on the examples of the job's `task:` section (T5 encoder-decoder)."""

    name: Literal["seq2seq"] = Field(description="Objective name; selects this objective.")


class Seq2SeqData:
    """The task's training examples as fixed-size token arrays, read in SampleOrder."""

    def __init__(self, task: TaskData, tokenizer, lengths: Seq2SeqLengths, seed: int):
        self.task = task
        self.lengths = lengths
        self.tokenizer = tokenizer  # generation decodes with it
        self.examples = tokenize_examples(task.splits["train"], tokenizer, lengths)
        if not len(self.examples):
            raise ValueError(f"no training example left after tokenizing:\n{self.examples.summary()}")
        self.order = SampleOrder(len(self.examples), seed)
        self.num_samples = len(self.examples)
        self.tokens_per_sample = lengths.input_length + lengths.target_length  # padded, as computed

    def get_batch(self, global_indices: np.ndarray) -> dict:
        return get_batch(self.examples, self.order.windows(global_indices))

    def summary(self) -> str:
        return f"{self.task.summary()}\n{self.examples.summary()}"

    def flops_per_sample(self, model_config) -> float:
        return t5_flops_per_sample(model_config, self.lengths.input_length, self.lengths.target_length)

    def evaluate(self, model, cfg: EvalConfig, run_dir: Path) -> EvalResult | None:
        """Collective: greedy generation on split `cfg.split`, each rank its shard, scored by the
        task on rank 0 (None on the others); the predictions file is among the result's files
        (RUN_DIR/predictions/, the report's under RUN_DIR/eval/)."""
        examples = self.task.splits[cfg.split]
        start = time.perf_counter()
        shard = [examples[i] for i in get_shard(len(examples))]
        log.info("evaluation: generating for %d of the %d examples of split %s", len(shard), len(examples), cfg.split)
        records = gather_shards(generate_predictions(model, self.tokenizer, shard, cfg.batch_size,
                                                     cfg.max_new_tokens or self.lengths.target_length,
                                                     self.lengths.input_length))
        if records is None:
            return None
        result, predictions = score_split(self.task, cfg.split, records, time.perf_counter() - start, run_dir)
        result.files.append(predictions)
        return result


def score_split(task: TaskData, split: str, records: list[dict], generate_s: float,
                run_dir: Path) -> tuple[EvalResult, Path]:
    """The predictions of every example of the split (in its order): RUN_DIR/predictions/<split>.jsonl
    and the task's report files under RUN_DIR/eval/; the metrics include the generation's own figures."""
    examples = task.splits[split]
    predictions_path = write_predictions(records, run_dir / "predictions" / f"{split}.jsonl")
    num_errors = sum(r["error"] is not None for r in records)
    if num_errors:
        log.warning("%d of %d examples failed to generate (empty predictions); first error: %s", num_errors,
                    len(records), next(r["error"] for r in records if r["error"]))
    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = task.evaluate(examples, [r["prediction"] for r in records], out_dir, split)
    result.metrics.update(num_examples=len(records), num_errors=num_errors, generate_s=generate_s,
                          latency_ms=float(np.mean([r["latency_ms"] for r in records])) if records else 0.0)
    metrics_path = out_dir / f"{split}_metrics.json"
    metrics_path.write_text(json.dumps(result.metrics, indent=2) + "\n", encoding="utf-8")
    result.files.append(metrics_path)
    return result, predictions_path
