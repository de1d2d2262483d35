"""Where each data-prep stage lives under `DataConfig.output_dir` (pure path functions)."""
from __future__ import annotations

from pathlib import Path


def docs_dir(output_dir: str | Path) -> Path:
    """Cleaned documents: Arrow shards, manifest.json, rejects.jsonl."""
    return Path(output_dir) / "docs"


def tokenizer_dir(output_dir: str | Path) -> Path:
    """spiece.model plus the Hugging Face tokenizer files."""
    return Path(output_dir) / "tokenizer"


def tokens_dir(output_dir: str | Path) -> Path:
    """Packed token windows: Arrow shards of input_ids and manifest.json."""
    return Path(output_dir) / "tokens"


def docs_work_dir(output_dir: str | Path) -> Path:
    """Per-unit outputs of the docs stage (kept across interrupted runs, removed once tokens/ is complete)."""
    return Path(output_dir) / "work" / "docs"


def keep_file(work_dir: Path) -> Path:
    """The docs merge's keep mask over every unit's documents, in canonical order (one bool each):
    the tokens stage packs pre-encoded units with it."""
    return work_dir / "keep.npy"
