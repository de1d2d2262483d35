"""Packed token windows, the order in which ranks read them, and the span-corruption data.

Each objective's data object exposes what the training loop needs: `num_samples`,
`tokens_per_sample` and `flops_per_sample(model_config)` (for the throughput metrics),
`get_batch(global_indices)` -> the model's forward arguments, and `evaluate(model, eval_cfg,
run_dir)` -> the evaluation after the last step, a collective (a finetune.tasks.EvalResult on
rank 0, None on the others), or `evaluate = None` for an objective without one.
Seq2seq's is trainer.seq2seq.Seq2SeqData, causal_lm's trainer.causal_lm.CausalLMData.

Token shards are Arrow IPC stream files written by data prep (`tokens/shard-*.arrow`, one
column `input_ids: fixed_size_list<int32>[pack_length]`, described by `tokens/manifest.json`).
They are memory-mapped, so every rank "loads" the whole corpus without reading it.

The data order is a pure function of (seed, epoch, global sample index): global sample g
belongs to epoch g // N and is window perm_epoch[g % N]. A run resumed at step k computes
its batches directly from k (O(1) in k, no replay), and sees exactly the batches an
uninterrupted run would have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa

from trainer.flops import t5_flops_per_sample
from trainer.span_corruption import SpanCorruptionCollator, sample_seed


class TokenWindows:
    """All packed windows of a tokens directory, as one [N, pack_length] int32 view."""

    def __init__(self, tokens_dir: str | Path):
        tokens_dir = Path(tokens_dir)
        manifest_path = tokens_dir / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: no token manifest; run `t5ja prep` for this job first")
        self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        self.pack_length = int(self.manifest["pack_length"])
        self._shards = [self._map_shard(tokens_dir / s["file"]) for s in self.manifest["shards"]]
        self._offsets = np.cumsum([0] + [len(s) for s in self._shards])
        if self._offsets[-1] == 0:
            raise ValueError(f"{tokens_dir}: the token shards hold no window of {self.pack_length} tokens")

    def _map_shard(self, path: Path) -> np.ndarray:
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        flat = _numpy_view(table.column("input_ids").combine_chunks().values)
        return flat.reshape(-1, self.pack_length)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def get(self, indices: np.ndarray) -> np.ndarray:
        """Windows at the given global window indices, as a new [len(indices), L] array."""
        shard_ids = np.searchsorted(self._offsets, indices, side="right") - 1
        rows = [self._shards[s][i - self._offsets[s]] for s, i in zip(shard_ids, indices)]
        return np.stack(rows).astype(np.int64)


def _numpy_view(values: pa.Array) -> np.ndarray:
    """`values.to_numpy(zero_copy_only=True)`: a read-only view of the memory-mapped data. For
    an integer array without nulls (the token ids) the view is taken from its data buffer
    directly, because pyarrow's conversion imports pandas (~1 s of CPU in every rank at every
    start) for nothing here. Anything else (nulls, empty, other types) goes through pyarrow."""
    if not pa.types.is_integer(values.type) or values.null_count or not len(values):
        return values.to_numpy(zero_copy_only=True)
    dtype = np.dtype(str(values.type))  # int8 ... uint64: numpy's names for arrow's integer types
    view = np.frombuffer(values.buffers()[1], dtype=dtype, count=len(values), offset=values.offset * dtype.itemsize)
    view.flags.writeable = False  # as pyarrow's zero-copy views: Arrow data is immutable
    return view


@dataclass(frozen=True)
class SampleOrder:
    """Maps global sample indices to window indices: a fresh permutation per epoch."""

    num_windows: int
    seed: int

    def epoch_of(self, global_index: int) -> int:
        return global_index // self.num_windows

    def windows(self, global_indices: np.ndarray) -> np.ndarray:
        epochs = global_indices // self.num_windows
        positions = global_indices % self.num_windows
        return np.array([_permutation(self.num_windows, self.seed, int(e))[p] for e, p in zip(epochs, positions)])


@lru_cache(maxsize=2)
def _permutation(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_windows)


@dataclass(frozen=True)
class BatchPlan:
    """Which global sample indices each rank reads at each micro-step.

    Optimizer step s consumes samples [s*G, (s+1)*G). Micro-step m of that step gives rank r
    the contiguous slice starting at s*G + (m*W + r)*micro, so the samples of one step are
    the same for any (world size, accumulation) split of the same global batch.
    """

    global_batch_size: int
    micro_batch_size: int
    world_size: int

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def micro_batch_indices(self, step: int, micro_step: int, rank: int) -> np.ndarray:
        start = step * self.global_batch_size + (micro_step * self.world_size + rank) * self.micro_batch_size
        return np.arange(start, start + self.micro_batch_size, dtype=np.int64)


class SpanCorruptionData:
    """Packed windows of data prep, corrupted per sample (seeded by (seed, epoch, index))."""

    def __init__(self, tokens_dir: str | Path, objective, tokenizer, seed: int):
        self.windows = TokenWindows(tokens_dir)
        if self.windows.pack_length != objective.expanded_length:
            raise ValueError(
                f"{tokens_dir}: windows of {self.windows.pack_length} tokens, but objective.input_length="
                f"{objective.input_length} needs {objective.expanded_length}; rerun `t5ja prep`"
            )
        self.seed = seed
        self.order = SampleOrder(len(self.windows), seed)
        self.num_samples = len(self.windows)
        self.tokens_per_sample = self.windows.pack_length  # packed-window tokens (input_length 512 -> 568)
        # T5 layout: <extra_id_0> is the highest tokenizer id, the others count down.
        self.collator = SpanCorruptionCollator(
            objective, eos_id=tokenizer.eos_token_id, first_sentinel_id=len(tokenizer) - 1
        )
        self.objective = objective

    def get_batch(self, global_indices: np.ndarray) -> dict:
        windows = self.windows.get(self.order.windows(global_indices))
        seeds = [sample_seed(self.seed, self.order.epoch_of(int(g)), int(g)) for g in global_indices]
        return self.collator(windows, seeds)

    def summary(self) -> str:
        return f"{self.num_samples} packed windows of {self.tokens_per_sample} tokens"

    def flops_per_sample(self, model_config) -> float:
        return t5_flops_per_sample(model_config, self.objective.input_length, self.objective.target_length)

    evaluate = None  # no evaluation task: the pretraining objective is scored by its training loss
