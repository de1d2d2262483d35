"""The bare DeepSpeed loop of `bench/train.py`, started by torchrun on every rank:

    torchrun --nproc-per-node 2 bench/train_bare.py RUN_DIR --steps 30 --from-step 10 --result OUT.json

Builds what the project's trainer builds for RUN_DIR (the same model preset, optimizer and
filled ds_config, read from RUN_DIR/config.json and RUN_DIR/ds_config.json), then runs
forward/backward/step on one synthetic batch of the trainer's shapes: no data loading, no
span corruption, no logging, no checkpoints. Rank 0 writes the wall time of steps
(from_step, steps], measured between two barriers, to OUT.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import load_worker_config  # noqa: E402
from trainer.distributed import init_distributed  # noqa: E402
from trainer.model import build_model  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.train import is_offload_optimizer  # noqa: E402


def synthetic_batch(micro_batch: int, input_length: int, target_length: int, vocab: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(2, vocab, (micro_batch, input_length), generator=generator),
        "labels": torch.randint(2, vocab, (micro_batch, target_length), generator=generator),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--from-step", type=int, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()

    import deepspeed
    from transformers import AutoTokenizer

    cfg = load_worker_config(args.run_dir / "config.json")
    init_distributed()
    torch.manual_seed(cfg.train.seed)
    vocab = len(AutoTokenizer.from_pretrained(cfg.run.tokenizer_dir))
    model = build_model(cfg.model, vocab)
    ds_config = json.loads(Path(cfg.run.ds_config).read_text())
    engine, _, _, _ = deepspeed.initialize(model=model,
                                           optimizer=build_optimizer(model, cfg.train, is_offload_optimizer(ds_config)),
                                           config=ds_config)
    batch = synthetic_batch(cfg.train.micro_batch_size, cfg.objective.input_length, cfg.objective.target_length, vocab)
    accumulation = cfg.run.gradient_accumulation_steps
    for step in range(1, args.steps + 1):
        if step == args.from_step + 1:
            dist.barrier()
            start = time.perf_counter()
        for _ in range(accumulation):
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
        loss.item()  # the step's results are materialised, as the trainer's loss logging does
    dist.barrier()
    seconds = time.perf_counter() - start
    if dist.get_rank() == 0:
        args.result.write_text(json.dumps({"seconds": seconds, "steps": args.steps - args.from_step}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
