"""finetune.livedoor: the tarball reader, the split, the text-to-text format and the report."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from finetune.livedoor import (INVALID, LivedoorConfig, build_livedoor_task, evaluate_livedoor, format_input,
                               get_labels, parse_predictions, read_livedoor, split_articles)

ROOT = Path(__file__).resolve().parents[1]
NEKO = ROOT / "data_prep" / "samples" / "neko.txt"
REAL_TARBALL = Path("/work/shared/data/livedoor/ldcc-20140209-text.tar.gz")
GENRES = ("movie-enter", "peachy", "smax")


def _neko_sentences(count: int) -> list[str]:
    lines = [line.strip() for line in NEKO.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if len(line) > 8][:count]


def _add(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode("utf-8")
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tarball(path: Path, per_genre: int = 10, extra: dict[str, str] | None = None) -> Path:
    """The ldcc layout in small: text/<genre>/<genre>-<id>.txt plus README/CHANGES/LICENSE."""
    sentences = _neko_sentences(per_genre * len(GENRES) * 2)
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "text/README.txt", "readme\n")
        _add(tar, "text/CHANGES.txt", "changes\n")
        for g, genre in enumerate(GENRES):
            _add(tar, f"text/{genre}/LICENSE.txt", "licence\n")
            for i in range(per_genre):
                title, body = sentences[2 * (g * per_genre + i)], sentences[2 * (g * per_genre + i) + 1]
                header = f"http://news.livedoor.com/article/detail/{1000 + i}/\n2012-01-01T00:00:00+0900\n"
                article = f"{header}{title}\n{body}\n\n　ｶﾀｶﾅ　本文２行目\n"
                _add(tar, f"text/{genre}/{genre}-{1000 + i}.txt", article)
        for name, text in (extra or {}).items():
            _add(tar, name, text)
    return path


def test_reads_articles_counts_docs_and_reports_bad_members(tmp_path):
    extra = {"text/smax/smax-9.txt": "http://x\n2012\n", "text/smax/notes.md": "x",
             "text/smax/smax-10.txt": "not a url\ndate\ntitle\nbody"}
    corpus = read_livedoor(write_tarball(tmp_path / "ldcc.tar.gz", extra=extra))
    assert len(corpus.articles) == 30 and corpus.genres == sorted(GENRES)
    assert len(corpus.doc_files) == 2 + len(GENRES)
    reasons = dict(corpus.report.skipped)
    assert set(reasons) == set(extra)
    assert "2 line(s)" in reasons["text/smax/smax-9.txt"] and "not a URL" in reasons["text/smax/smax-10.txt"]
    first = corpus.articles[0]
    assert (first.genre, first.article_id) == ("movie-enter", "1000") and first.url.startswith("http")


def test_input_is_normalised_title_and_body_on_one_line(tmp_path):
    corpus = read_livedoor(write_tarball(tmp_path / "ldcc.tar.gz"))
    article = corpus.articles[0]
    text = format_input(article)
    assert text.startswith(article.title.strip() + " ") and "\n" not in text
    # neologdn: half-width kana and full-width digits folded, the space between Japanese words dropped.
    assert text.endswith("。 カタカナ本文2行目")


def test_split_is_seeded_disjoint_and_sized(tmp_path):
    corpus = read_livedoor(write_tarball(tmp_path / "ldcc.tar.gz", per_genre=20))
    cfg = LivedoorConfig(path="x", seed=7)
    splits = split_articles(corpus.articles, cfg)
    assert {k: len(v) for k, v in splits.items()} == {"train": 42, "valid": 9, "test": 9}
    ids = [a.article_id + a.genre for part in splits.values() for a in part]
    assert len(set(ids)) == 60
    assert split_articles(list(reversed(corpus.articles)), cfg) == splits  # order of the tar does not matter
    assert split_articles(corpus.articles, LivedoorConfig(path="x", seed=8))["test"] != splits["test"]


def test_config_errors_name_the_key():
    with pytest.raises(ValidationError, match="must be 1"):
        LivedoorConfig(path="x", train_fraction=0.8)
    with pytest.raises(ValidationError, match="target"):
        LivedoorConfig(path="x", target="name")
    with pytest.raises(ValidationError, match="unknown_key"):
        LivedoorConfig(path="x", unknown_key=1)


def test_task_report_and_confusion_png(tmp_path):
    task = build_livedoor_task(LivedoorConfig(path=str(write_tarball(tmp_path / "ldcc.tar.gz"))))
    assert task.labels == {"movie-enter": "0", "peachy": "1", "smax": "2"}
    test = task.splits["test"]
    predictions = [e.target for e in test]
    predictions[0] = "9"  # no label: counted as invalid, not dropped
    result = evaluate_livedoor(test, predictions, task.labels, png_path=tmp_path / "cm.png")
    assert result.metrics["num_invalid"] == 1 and result.labels[-1] == INVALID
    assert result.metrics["accuracy"] == pytest.approx((len(test) - 1) / len(test))
    assert "weighted avg" in result.text and (tmp_path / "cm.png").stat().st_size > 0
    assert parse_predictions([" 1 ", "peachy"], task.labels) == ["peachy", INVALID]
    assert get_labels(["b", "a"], "genre") == {"a": "a", "b": "b"}


def test_missing_tarball_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such livedoor tarball"):
        read_livedoor(tmp_path / "nope.tar.gz")


@pytest.mark.skipif(not REAL_TARBALL.is_file(), reason="the real livedoor tarball is not in /work/shared/data")
def test_real_tarball():
    corpus = read_livedoor(REAL_TARBALL)
    assert len(corpus.articles) == 7367 and len(corpus.genres) == 9 and corpus.report.num_skipped == 0
    splits = split_articles(corpus.articles, LivedoorConfig(path=str(REAL_TARBALL)))
    assert {k: len(v) for k, v in splits.items()} == {"train": 5157, "valid": 1105, "test": 1105}
