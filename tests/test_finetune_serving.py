"""finetune.serving: request metrics, pass@1, human ratings, the printed table."""

from __future__ import annotations

import math

import pytest

from finetune.serving import (format_eval_table, pass_at_1, read_ratings_csv, summarize_ratings,
                              summarize_requests)


def record(request_id: str, prediction: str = "ok", latency_ms: float = 10.0, error: str | None = None,
           target: str = "ok") -> dict:
    return {"id": request_id, "input": "", "target": target, "prediction": prediction,
            "latency_ms": latency_ms, "error": error}


def test_latency_throughput_and_memory_by_hand():
    records = [record(str(i), latency_ms=ms) for i, ms in enumerate([10, 20, 30, 40])]
    summary = summarize_requests(records, wall_s=2.0, memory_bytes=3 * 2**20)
    assert summary["requests_per_s"] == 2.0
    assert summary["latency_mean_ms"] == 25.0 and summary["latency_p50_ms"] == 25.0
    assert summary["latency_p95_ms"] == pytest.approx(38.5)  # linear: 30 + 0.85 x (40 - 30)
    assert (summary["num_requests"], summary["num_errors"], summary["error_rate"]) == (4, 0, 0.0)
    assert summary["memory_peak_mib"] == 3.0


def test_errors_and_empty_predictions_are_failures():
    records = [record("a", latency_ms=10), record("b", prediction="", latency_ms=20),
               record("c", prediction=" \n", latency_ms=30), record("d", prediction="", latency_ms=999, error="OOM")]
    summary = summarize_requests(records, wall_s=1.0)
    assert (summary["num_errors"], summary["error_rate"]) == (3, 0.75)
    assert summary["latency_mean_ms"] == 20.0  # the batch that raised has no latency to report
    assert "memory_peak_mib" not in summary


def test_no_completed_request_has_nan_latency_and_bad_input_is_an_error():
    summary = summarize_requests([record("a", prediction="", error="boom")], wall_s=1.0)
    assert math.isnan(summary["latency_p95_ms"]) and summary["error_rate"] == 1.0
    with pytest.raises(ValueError, match="no requests"):
        summarize_requests([], wall_s=1.0)
    with pytest.raises(ValueError, match="wall_s"):
        summarize_requests([record("a")], wall_s=0)


def test_pass_at_1_counts_failures_as_wrong_without_asking_the_predicate():
    records = [record("a", "0", target="0"), record("b", "1", target="0"), record("c", " 2 ", target="2"),
               record("d", "", error="boom", target="")]

    def exact(r: dict) -> bool:
        assert r["error"] is None
        return r["prediction"].strip() == r["target"]

    assert pass_at_1(records, exact) == 0.5
    with pytest.raises(ValueError):
        pass_at_1([], exact)


RATINGS = (
    "\ufeffrequest_id,rating\n"  # a spreadsheet's byte-order mark
    "a,5\n"
    ",3\n"           # line 3: missing id
    "b,good\n"       # line 4: not an integer
    "c,4.5\n"        # line 5: not an integer
    "d,0\n"          # line 6: out of range
    "e,6\n"          # line 7: out of range
    "a,1\n"          # line 8: duplicate
    "f,3,extra\n"    # line 9: too many fields
    "\n"             # line 10: blank, not a record
    " g , 2 \n"      # line 11: spaces around the values are fine
)


def test_ratings_csv_skips_and_reports_every_bad_row(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text(RATINGS, encoding="utf-8")
    ratings, report = read_ratings_csv(path)
    assert ratings == {"a": 5, "g": 2} and report.num_kept == 2
    reasons = dict(report.skipped)
    assert list(reasons) == [f"{path}:{line}" for line in (3, 4, 5, 6, 7, 8, 9)]
    assert reasons[f"{path}:3"] == "missing request_id"
    assert "'good' is not an integer" in reasons[f"{path}:4"] and "'4.5' is not an integer" in reasons[f"{path}:5"]
    assert "outside 1..5" in reasons[f"{path}:6"] and "outside 1..5" in reasons[f"{path}:7"]
    assert reasons[f"{path}:8"] == f"duplicate request_id 'a' (first rated at {path}:2)"
    assert "3 field(s)" in reasons[f"{path}:9"]


@pytest.mark.parametrize("text", ["", "id,rating\na,5\n", "request_id,rating,comment\na,5,\n", "a,5\n"])
def test_ratings_csv_without_its_header_is_an_error(tmp_path, text):
    path = tmp_path / "ratings.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}: header .*expected 'request_id,rating'"):
        read_ratings_csv(path)


def test_missing_ratings_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.csv: no such ratings file .*'request_id,rating'"):
        read_ratings_csv(tmp_path / "missing.csv")


def test_summarize_ratings_keeps_unknown_ids_out_of_the_mean():
    ratings = {"a": 5, "b": 2, "x": 1}
    assert summarize_ratings(ratings) == {"satisfaction/mean_rating": 8 / 3, "satisfaction/num_ratings": 3}
    assert summarize_ratings(ratings, known_ids=["a", "b", "c"]) == {
        "satisfaction/mean_rating": 3.5, "satisfaction/num_ratings": 2, "satisfaction/num_unknown_ids": 1}
    with pytest.raises(ValueError, match="none of a known request id"):
        summarize_ratings({"x": 1}, known_ids=["a"])
    with pytest.raises(ValueError):
        summarize_ratings({})


def test_eval_table_is_two_aligned_columns():
    table = format_eval_table({"requests_per_s": 12.5, "num_requests": 1000, "satisfaction/mean_rating": 3.25})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "value"] and set(lines[1]) == {"-", " "}
    assert lines[2].split() == ["requests_per_s", "12.5000"] and lines[3].split() == ["num_requests", "1000"]
    assert len({len(line) for line in lines}) == 1 and lines[2].endswith("12.5000")  # values right-aligned
