"""Worker of tests/test_causal_export.py, started by torchrun on 2 ranks: a causal LM of the
run's preset under the run's DeepSpeed config (ZeRO-3), two updates on fixed random tokens,
the trainer's atomic checkpoint, and the engine's logits on a fixed batch (rank 0 saves them).

    torchrun --nproc-per-node 2 tests/causal_export_worker.py RUN_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import checkpoint as ckpt  # noqa: E402
from trainer.__main__ import exit_without_teardown  # noqa: E402
from trainer.config import load_worker_config  # noqa: E402
from trainer.distributed import init_distributed  # noqa: E402
from trainer.model import build_model  # noqa: E402


def main(run_dir: Path) -> None:
    import deepspeed
    from transformers import AutoTokenizer

    cfg = load_worker_config(run_dir / "config.json")
    init_distributed()
    torch.manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(cfg.run.tokenizer_dir))
    model = build_model(cfg.model, vocab)
    ds_config = json.loads(Path(cfg.run.ds_config).read_text())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    generator = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(2 * cfg.run.gradient_accumulation_steps):
        ids = torch.randint(3, vocab, (cfg.train.micro_batch_size, 32), generator=generator)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    ckpt.save_checkpoint(engine, run_dir, ckpt.TrainState(step=2), run_dir / "config.json", cfg.checkpoint)
    batch = torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(123))
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=batch).logits.float()  # collective under ZeRO-3
    if dist.get_rank() == 0:
        torch.save({"input_ids": batch, "logits": logits}, run_dir / "engine_logits.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_without_teardown(0)  # as the trainer: everything is saved, skip the seconds of teardown
