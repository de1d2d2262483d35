"""`t5ja export`: a Hugging Face `save_pretrained` directory from a run's ZeRO checkpoint,
in one CPU process, without the engine (DeepSpeed's zero_to_fp32 gathers the shards)."""

from __future__ import annotations

from pathlib import Path

from trainer import checkpoint as ckpt
from trainer import heap
from trainer.config import load_worker_config
from trainer.model import build_model


def choose_tag(run_dir: Path, step: int | None, verify: str) -> str:
    if step is None:
        tag = ckpt.choose_resume_tag(run_dir, verify)
        if tag is None:
            raise FileNotFoundError(f"{ckpt.checkpoints_dir(run_dir)}: no checkpoint to export")
        return tag
    tag = ckpt.tag_for(step)
    problems = ckpt.get_checkpoint_problems(ckpt.checkpoints_dir(run_dir) / tag, verify)
    if problems:
        available = ", ".join(ckpt.list_complete_tags(run_dir)) or "none"
        raise FileNotFoundError(f"checkpoint {tag} is not usable ({problems[0]}); complete ones: {available}")
    return tag


def export_run(run_dir: Path, step: int | None = None, out_dir: Path | None = None) -> Path:
    """Export checkpoint `step` (default: the newest usable one); returns the output directory."""
    cfg = load_worker_config(run_dir / "config.json")
    tag = choose_tag(run_dir, step, cfg.checkpoint.verify)
    tokenizer_dir = Path(cfg.run.tokenizer_dir)
    out_dir = out_dir or run_dir / "export"
    with heap.collection_paused():  # transformers, the model, the checkpoint: all loading (trainer/heap.py)
        from transformers import AutoTokenizer

        model = build_model(cfg.model, len(AutoTokenizer.from_pretrained(tokenizer_dir)))
        ckpt.export_hf(model, ckpt.consolidated_state_dict(run_dir, tag), tokenizer_dir, out_dir)
    return out_dir
