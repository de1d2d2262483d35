"""Typed configuration for data preparation: what to read, and how to build the tokenizer."""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class InputSpec(BaseModel):
    """One corpus input: a file or a glob of files in one format."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="File path or glob pattern (e.g. 'corpus/*.txt').")
    format: Literal["text", "jsonl"] = Field(
        "text", description="'text': one paragraph per line, blank line ends a document; 'jsonl': one JSON object per line."
    )
    text_field: str = Field("text", description="JSON key holding the document text (jsonl only).")
    source: str | None = Field(None, description="Name shown in stats and document ids; default: the file stem.")


class DataConfig(BaseModel):
    """Corpus inputs, cleaning and sharding for the docs and tokens stages."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[InputSpec] = Field(..., min_length=1, description="Corpus inputs; a plain string is a text-format path.")
    output_dir: str = Field(..., description="Directory that receives docs/, tokenizer/ and tokens/.")
    shard_bytes: int = Field(256 * 2**20, gt=0, description="Target size of one Arrow shard file, in bytes.")
    min_chars: int = Field(1, ge=0, description="Documents shorter than this after cleaning are dropped (counted).")
    pack_length: int | None = Field(
        None, gt=1, description="Packed token window length; None lets the launcher derive it from the objective."
    )

    @field_validator("inputs", mode="before")
    @classmethod
    def _coerce_plain_paths(cls, value: Any) -> Any:
        # YAML convenience: `inputs: [a.txt, {path: b.jsonl, format: jsonl}]`.
        if isinstance(value, list):
            return [{"path": item} if isinstance(item, str) else item for item in value]
        return value

    def find_problems(self) -> list[tuple[str, str]]:
        """(yaml_path, message) for every input whose path or glob matches no file."""
        return [
            (f"data.inputs[{i}].path", f"no file matches {spec.path!r}")
            for i, spec in enumerate(self.inputs)
            if not resolve_input_files(spec)
        ]


class TokenizerConfig(BaseModel):
    """SentencePiece training options (T5 layout: pad 0, eos 1, unk 2, sentinels at the top)."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(32000, gt=0, description="SentencePiece pieces, not counting the sentinel tokens.")
    model_type: Literal["unigram", "bpe"] = Field("unigram", description="SentencePiece model type.")
    character_coverage: float = Field(
        0.9995, gt=0, le=1, description="Share of characters covered by pieces; the rest falls back to bytes."
    )
    sample_sentences: int = Field(1_000_000, gt=0, description="Max lines sampled from the doc shards to train on.")
    num_sentinels: int = Field(100, ge=0, description="Number of <extra_id_N> sentinel tokens appended after the pieces.")
    seed: int = Field(0, description="Seed of the training-line sample.")
    path: str | None = Field(None, description="Existing tokenizer directory (with spiece.model) to use instead of training.")


def resolve_input_files(spec: InputSpec) -> list[Path]:
    """Sorted files matched by `spec.path` (a plain path matches itself if it is a file)."""
    return sorted(Path(p) for p in glob.glob(spec.path, recursive=True) if Path(p).is_file())
