"""Fine-tuning tasks as data: readers, text-to-text formatting and metrics, no training loop.

- `livedoor`: the livedoor news corpus tarball -> genre classification examples (T5 seq2seq)
- `jglue`: JSQuAD, JNLI, JSTS, JCommonsenseQA -> text-to-text examples and their metrics
- `chat`: chat JSON lines in Gemma's turn format, loss masks, packing; a livedoor SFT set
- `metrics`: classification report + confusion matrix, SQuAD v1 EM/F1, correlations, accuracy

Every reader returns what it kept *and* what it skipped (with the file, line and reason):
nothing is dropped without being counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Example:
    """One text-to-text example: the encoder input, the decoder target and what scoring needs."""

    id: str
    input: str
    target: str
    label: str | float | int | None = None  # the gold value the metric compares with
    references: tuple[str, ...] = ()  # all gold answers (JSQuAD); empty elsewhere


@dataclass
class ReadReport:
    """Records read from one source: how many were kept and which were skipped, and why."""

    source: str
    num_kept: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (record location, reason)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def skip(self, where: str, reason: str) -> None:
        self.skipped.append((where, reason))

    def summary(self, max_listed: int = 5) -> str:
        head = f"{self.source}: {self.num_kept} kept, {self.num_skipped} skipped"
        listed = [f"  - {where}: {reason}" for where, reason in self.skipped[:max_listed]]
        more = [f"  ... and {self.num_skipped - max_listed} more"] if self.num_skipped > max_listed else []
        return "\n".join([head, *listed, *more])


def read_json_lines(path: str | Path, report: ReadReport):
    """(location, record) of each JSON object line; bad lines go to the report."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                report.skip(f"{path}:{number}", f"not JSON: {err.msg}")
                continue
            if not isinstance(record, dict):
                report.skip(f"{path}:{number}", f"expected a JSON object, got {type(record).__name__}")
                continue
            yield f"{path}:{number}", record
