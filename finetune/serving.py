"""Serving a generating model in batches, and the seed's evaluation metrics of it: throughput,
latency, errors, pass@1 and human satisfaction ratings.

`predict_in_batches` runs the requests (any model, any generate function: T5's
`finetune.seq2seq.generate_predictions`, a causal LM's `finetune.chat.generate_answers`) and
keeps one record per request, {"id", "input", "target", "prediction", "latency_ms", "error"}.
Everything else here is a pure function over those records and over a ratings CSV.

One definition of a failed request serves every metric here: it raised (its "error" is set) or
it produced no text (an empty or whitespace-only prediction). A user gets nothing from either.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from finetune import Example, ReadReport

RATINGS_HEADER = ("request_id", "rating")
MIN_RATING, MAX_RATING = 1, 5  # a 5-point Likert scale
LOGGED_INPUT_CHARS = 200  # a prediction record keeps this much of its input: enough to recognise it

# A batch of requests -> their generated texts, in order (raising fails the whole batch).
GenerateBatch = Callable[[Sequence[Example]], list[str]]


# --- serving --------------------------------------------------------------------------------

def _build_record(example: Example, prediction: str, latency_ms: float, error: str | None) -> dict:
    return {"id": example.id, "input": example.input[:LOGGED_INPUT_CHARS], "target": example.target,
            "prediction": prediction, "latency_ms": latency_ms, "error": error}


def _predict_batch(generate: GenerateBatch, batch: Sequence[Example]) -> list[dict]:
    start = time.perf_counter()
    try:
        predictions, error = generate(batch), None
    except Exception as err:  # noqa: BLE001 - one failed batch (OOM, bad input) must not end the evaluation
        predictions, error = [""] * len(batch), f"{type(err).__name__}: {err}"
    latency_ms = 1000 * (time.perf_counter() - start) / len(batch)
    return [_build_record(e, p, latency_ms, error) for e, p in zip(batch, predictions)]


def predict_in_batches(model, examples: Sequence[Example], batch_size: int, generate: GenerateBatch) -> list[dict]:
    """One record per example, in order: {"id", "input" (first 200 characters), "target",
    "prediction", "latency_ms", "error"}, `generate` called on `batch_size` examples at a time.

    latency_ms is the batch's wall time (`generate`: tokenise, generate, decode) divided by its
    size: the amortised cost of a request at this batch size. A request's own wait in a batch is
    the whole batch time (latency_ms x batch size). A batch that raises gives each of its
    examples an empty prediction and the exception text in "error" (its latency_ms: the time
    until it raised); the other batches still run.

    `model` (the one `generate` uses) is put in eval mode meanwhile and given back in the mode
    it came in.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        records: list[dict] = []
        for start in range(0, len(examples), batch_size):
            records += _predict_batch(generate, examples[start:start + batch_size])
    finally:
        model.train(was_training)
    return records


# --- request metrics ------------------------------------------------------------------------


def is_failed(record: Mapping) -> bool:
    """The request raised or produced no text."""
    return record.get("error") is not None or not str(record.get("prediction") or "").strip()


def get_latency_stats(latencies_ms: Sequence[float]) -> dict[str, float]:
    """Mean, median and 95th percentile in ms; percentiles by numpy's default linear
    interpolation between the closest ranks ([10, 20, 30, 40] -> p95 38.5). NaN when empty."""
    if not latencies_ms:
        return {"latency_mean_ms": math.nan, "latency_p50_ms": math.nan, "latency_p95_ms": math.nan}
    values = np.asarray(latencies_ms, dtype=np.float64)
    return {"latency_mean_ms": float(values.mean()),
            "latency_p50_ms": float(np.percentile(values, 50, method="linear")),
            "latency_p95_ms": float(np.percentile(values, 95, method="linear"))}


def summarize_requests(records: Sequence[Mapping], wall_s: float, memory_bytes: int | None = None) -> dict:
    """Throughput over the whole evaluation's wall time, latency of the requests that ran to the
    end (those whose "error" is None: a batch that raised has no meaningful latency), and the share
    of failed requests (see `is_failed`). `memory_bytes`: the peak memory, if known (the caller says of
    what: the accelerator's allocations, or the process's resident set on a CPU)."""
    if not records:
        raise ValueError("no requests to summarise")
    if not wall_s > 0:
        raise ValueError(f"wall_s must be positive, got {wall_s}")
    num_errors = sum(is_failed(r) for r in records)
    latencies = [r["latency_ms"] for r in records if r.get("error") is None and r.get("latency_ms") is not None]
    summary = {"num_requests": len(records), "num_errors": num_errors, "error_rate": num_errors / len(records),
               "requests_per_s": len(records) / wall_s, **get_latency_stats(latencies)}
    if memory_bytes is not None:
        summary["memory_peak_mib"] = memory_bytes / 2**20
    return summary


def pass_at_1(records: Sequence[Mapping], is_correct: Callable[[Mapping], bool]) -> float:
    """Share of requests whose single (greedy) prediction is correct by `is_correct(record)`;
    a failed request (see `is_failed`) is wrong and never reaches the predicate."""
    if not records:
        raise ValueError("no requests to score")
    return sum(not is_failed(r) and bool(is_correct(r)) for r in records) / len(records)


# --- human ratings --------------------------------------------------------------------------

def read_ratings_csv(path: str | Path) -> tuple[dict[str, int], ReadReport]:
    """request_id -> rating (an integer 1..5) from a CSV with the header `request_id,rating`.

    Bad rows are skipped and listed in the report as file:line with the reason; of two rows with
    the same id the first is kept. Read as utf-8-sig: spreadsheets often write a byte-order mark.
    A missing file or header is a ValueError naming the expected header.
    """
    path = Path(path)
    expected = ",".join(RATINGS_HEADER)
    if not path.is_file():
        raise ValueError(f"{path}: no such ratings file (a CSV with the header {expected!r})")
    report, ratings, first_line = ReadReport(str(path)), {}, {}
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = csv.reader(handle)
        header = [cell.strip() for cell in next(rows, [])]
        if tuple(header) != RATINGS_HEADER:
            raise ValueError(f"{path}: header is {','.join(header)!r}; expected {expected!r}")
        for row in rows:
            if not any(cell.strip() for cell in row):
                continue  # a blank line is no record
            where = f"{path}:{rows.line_num}"
            try:
                request_id, rating = _parse_rating_row(row, first_line)
            except ValueError as err:
                report.skip(where, str(err))
                continue
            ratings[request_id], first_line[request_id] = rating, where
    report.num_kept = len(ratings)
    return ratings, report


def _parse_rating_row(row: list[str], first_line: dict[str, str]) -> tuple[str, int]:
    if len(row) != len(RATINGS_HEADER):
        raise ValueError(f"{len(row)} field(s); expected {len(RATINGS_HEADER)} (request_id,rating)")
    request_id, text = row[0].strip(), row[1].strip()
    if not request_id:
        raise ValueError("missing request_id")
    try:
        rating = int(text)
    except ValueError:
        raise ValueError(f"rating {text!r} is not an integer") from None
    if not MIN_RATING <= rating <= MAX_RATING:
        raise ValueError(f"rating {rating} outside {MIN_RATING}..{MAX_RATING}")
    if request_id in first_line:
        raise ValueError(f"duplicate request_id {request_id!r} (first rated at {first_line[request_id]})")
    return request_id, rating


def summarize_ratings(ratings: Mapping[str, int], known_ids: Iterable[str] | None = None) -> dict:
    """Mean rating and count. With `known_ids` (the evaluated requests), ratings of other ids are
    counted in "satisfaction/num_unknown_ids" and left out of the mean: a ratings file of another
    run must not blend in unnoticed."""
    known = None if known_ids is None else set(known_ids)
    used = [r for request_id, r in ratings.items() if known is None or request_id in known]
    if not used:
        raise ValueError(f"no rating to summarise ({len(ratings)} rating(s), none of a known request id)"
                         if ratings else "no rating to summarise")
    summary = {"satisfaction/mean_rating": sum(used) / len(used), "satisfaction/num_ratings": len(used)}
    if known is not None:
        summary["satisfaction/num_unknown_ids"] = len(ratings) - len(used)
    return summary


# --- printing -------------------------------------------------------------------------------

def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_eval_table(metrics: Mapping[str, object]) -> str:
    """Two aligned columns, metric and value, in the dict's order (floats to 4 decimals)."""
    rows = [("metric", "value"), *((str(name), _format_value(value)) for name, value in metrics.items())]
    name_width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    lines = [f"{name:<{name_width}}  {value:>{value_width}}" for name, value in rows]
    lines.insert(1, f"{'-' * name_width}  {'-' * value_width}")
    return "\n".join(lines)
