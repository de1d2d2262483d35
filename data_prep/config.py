"""Typed configuration for data preparation: what to read, and how to build the tokenizer."""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


# "auto" detects the format from the file name and its first record (readers.detect_format).
InputFormat = Literal["auto", "text", "jsonl", "wikipedia_xml", "wikiextractor", "oscar2019", "oscar", "cc100"]


class InputSpec(BaseModel):
    """One corpus input: a file or a glob of files in one format."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="File path or glob pattern (e.g. 'corpus/*.txt').")
    format: InputFormat = Field(
        "auto",
        description="auto (from name and first record), text (paragraph per line, blank line ends a document), "
        "jsonl (text_field), wikipedia_xml (MediaWiki dump, .xml/.bz2), wikiextractor, oscar2019, oscar (22.01+ "
        "JSON lines), cc100",
    )
    text_field: str = Field("text", description="JSON key holding the document text (generic jsonl only).")
    source: str | None = Field(None, description="Name shown in stats and document ids; default: the file stem.")


class CleanConfig(BaseModel):
    """Text normalisation applied to every document before filtering."""

    model_config = ConfigDict(extra="forbid")

    normalize: Literal["neologdn", "nfkc", "none"] = Field(
        "neologdn", description="neologdn: NFKC plus the neologd rules Japanese pipelines use; nfkc: NFKC only"
    )


class FilterConfig(BaseModel):
    """Document filters; each drop is counted under its reason in the manifest."""

    model_config = ConfigDict(extra="forbid")

    min_chars: int = Field(1, ge=0, description="drop documents shorter than this after cleaning (too_short)")
    max_chars: int | None = Field(None, gt=0, description="drop documents longer than this (too_long); None: no bound")
    min_japanese_ratio: float = Field(
        0.0, ge=0, le=1, description="drop documents whose share of kana/kanji among non-space characters is lower (not_japanese)"
    )
    max_repeated_line_ratio: float = Field(
        1.0, ge=0, le=1, description="drop documents where more than this share of lines repeat an earlier line (boilerplate)"
    )
    oscar_drop_warnings: list[str] = Field(
        default_factory=list,
        description="drop OSCAR documents carrying any of these quality warnings, e.g. [tiny, noisy, header, footer] (quality_warning)",
    )


class DedupConfig(BaseModel):
    """Deduplication across the whole corpus: all inputs, workers and Slurm tasks."""

    model_config = ConfigDict(extra="forbid")

    exact: bool = Field(True, description="drop exact duplicates of an earlier document (16-byte hashes only)")
    near: bool = Field(False, description="also drop near-duplicates (MinHash LSH)")
    near_threshold: float = Field(0.8, gt=0, lt=1, description="estimated Jaccard similarity above which a document is a near-duplicate")
    num_perm: int = Field(128, ge=16, description="MinHash permutations")
    shingle_chars: int = Field(5, ge=1, description="character n-gram size of the MinHash shingles")


class DataConfig(BaseModel):
    """Corpus inputs, cleaning, filtering, dedup and sharding for the docs and tokens stages."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[InputSpec] = Field(..., min_length=1, description="Corpus inputs; a plain string is a path with format auto.")
    output_dir: str = Field(..., description="Directory that receives docs/, tokenizer/ and tokens/.")
    shard_bytes: int = Field(256 * 2**20, gt=0, description="Target size of one Arrow shard file, in bytes.")
    pack_length: int | None = Field(
        None, gt=1, description="Packed token window length; None lets the launcher derive it from the objective."
    )
    clean: CleanConfig = Field(default_factory=CleanConfig, description="text normalisation")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="document filters")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="exact and near-duplicate removal")
    num_workers: int = Field(0, ge=0, description="worker processes; 0: one per CPU core")
    unit_bytes: int = Field(
        256 * 2**20, gt=0, description="large splittable files (uncompressed, bz2 multistream) are cut into units of about this size"
    )
    max_line_bytes: int = Field(
        16 * 2**20, gt=0, description="a line longer than this is rejected (and logged) without being held in memory"
    )
    max_rejected_share: float = Field(
        0.05, ge=0, le=1, description="fail when an input's rejected records exceed this share of its records"
    )

    @field_validator("inputs", mode="before")
    @classmethod
    def _coerce_plain_paths(cls, value: Any) -> Any:
        # YAML convenience: `inputs: [a.txt, {path: b.jsonl, format: jsonl}]`.
        if isinstance(value, list):
            return [{"path": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _units_hold_a_line(self) -> "DataConfig":
        # A split re-aligns to a record start by looking back up to max_line_bytes: with
        # units smaller than that, the look-back would cost more than the unit's own work.
        if self.unit_bytes < self.max_line_bytes:
            raise ValueError(f"unit_bytes ({self.unit_bytes}) must be at least max_line_bytes ({self.max_line_bytes})")
        return self

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
    sample_sources: list[str] | None = Field(
        None, description="sources to draw the training sample from; default: the Wikipedia inputs if any (as the seed), else all"
    )


def resolve_input_files(spec: InputSpec) -> list[Path]:
    """Sorted files matched by `spec.path` (a plain path matches itself if it is a file)."""
    return sorted(Path(p) for p in glob.glob(spec.path, recursive=True) if Path(p).is_file())
