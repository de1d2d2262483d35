"""livedoor news corpus (ldcc-20140209) -> genre classification as text-to-text (T5 seq2seq).

Read from the distributed tarball as is (CC BY-ND 2.1 JP allows redistribution unmodified
only, so we never write a converted copy): `text/<genre>/<genre>-<id>.txt`, line 1 the URL,
line 2 the date, line 3 the title, lines 4+ the body. README.txt, CHANGES.txt and each
genre's LICENSE.txt are documentation, counted but not articles.

Input `"{title} {body}"` after the neologd normalisation that data prep applies to every
pretraining document (`data_prep.clean.normalize_neologdn`), target the genre's label: by
default its index "0".."8" in the sorted genre names, as in the t5-base-japanese benchmark
(sonoisa/t5-base-japanese) whose recipe this follows: lr 3e-4, batch 8, 4 epochs, inputs
of 512 tokens, targets of 4.
"""

from __future__ import annotations

import random
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from finetune import Example, ReadReport
from finetune.metrics import ClassificationResult, get_classification_result, save_confusion_matrix_png

# `text/<genre>/<genre>-<id>.txt`: the genre directory and the file's prefix must agree.
_ARTICLE_PATH = re.compile(r"^(?:.*/)?text/(?P<genre>[a-z0-9-]+)/(?P=genre)-(?P<id>\d+)\.txt$")
_DOC_FILES = frozenset({"README.txt", "CHANGES.txt", "LICENSE.txt"})
SPLITS = ("train", "valid", "test")

# The genres' own names (each genre's LICENSE.txt and site), for people and for the SFT set.
GENRE_NAMES: dict[str, str] = {
    "dokujo-tsushin": "独女通信",
    "it-life-hack": "ITライフハック",
    "kaden-channel": "家電チャンネル",
    "livedoor-homme": "livedoor HOMME",
    "movie-enter": "MOVIE ENTER",
    "peachy": "Peachy",
    "smax": "エスマックス",
    "sports-watch": "Sports Watch",
    "topic-news": "トピックニュース",
}


class LivedoorSplitConfig(BaseModel):
    """The livedoor tarball and its train/valid/test split (shared by the classification task and
    the chat SFT set built from the same articles: finetune.chat.build_livedoor_sft)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="the corpus tarball as distributed (ldcc-20140209.tar.gz)")
    seed: int = Field(1234, description="seed of the shuffle that splits the articles")
    train_fraction: float = Field(0.70, gt=0, lt=1, description="share of articles for training")
    valid_fraction: float = Field(0.15, ge=0, lt=1, description="share of articles for validation")
    test_fraction: float = Field(0.15, gt=0, lt=1, description="share of articles for the test report")

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> "LivedoorSplitConfig":
        total = self.train_fraction + self.valid_fraction + self.test_fraction
        if abs(total - 1) > 1e-6:
            raise ValueError(f"train_fraction + valid_fraction + test_fraction must be 1, got {total:g}")
        return self


class LivedoorConfig(LivedoorSplitConfig):
    """The livedoor genre classification task."""

    target: Literal["index", "genre"] = Field(
        "index", description="what the model writes: the genre's index in the sorted genres ('0'..'8') or its "
                             "directory name (dokujo-tsushin, ...)")


@dataclass(frozen=True)
class Article:
    genre: str
    article_id: str
    url: str
    date: str
    title: str
    body: str


@dataclass
class LivedoorCorpus:
    articles: list[Article]
    report: ReadReport
    doc_files: list[str] = field(default_factory=list)  # README/CHANGES/LICENSE members seen

    @property
    def genres(self) -> list[str]:
        return sorted({a.genre for a in self.articles})


def parse_article(genre: str, article_id: str, text: str) -> Article:
    """One article file; ValueError saying what is missing."""
    lines = text.splitlines()
    if len(lines) < 3:
        raise ValueError(f"{len(lines)} line(s); expected URL, date, title and a body")
    url, date, title = (line.strip() for line in lines[:3])
    if not url.startswith("http"):
        raise ValueError(f"line 1 is not a URL: {url[:60]!r}")
    if not title:
        raise ValueError("line 3 (the title) is empty")
    return Article(genre, article_id, url, date, title, "\n".join(lines[3:]))


def read_livedoor(path: str | Path) -> LivedoorCorpus:
    """Every article of the tarball, sorted by (genre, id) whatever the member order.

    Unreadable or malformed articles and unexpected members are listed in the report; only
    directories and the documentation files (counted in `doc_files`) are not records.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such livedoor tarball (ldcc-20140209.tar.gz)")
    report, articles, doc_files = ReadReport(str(path)), [], []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                article = _read_member(tar, member, report, doc_files)
                if article is not None:
                    articles.append(article)
    except tarfile.TarError as err:
        raise ValueError(f"{path}: not a readable tar archive: {err}") from None
    if not articles:
        raise ValueError(f"{path}: no article in the text/<genre>/<genre>-<id>.txt layout")
    articles.sort(key=lambda a: (a.genre, a.article_id))
    report.num_kept = len(articles)
    return LivedoorCorpus(articles, report, doc_files)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, report: ReadReport,
                 doc_files: list[str]) -> Article | None:
    if member.isdir():
        return None
    if Path(member.name).name in _DOC_FILES:
        doc_files.append(member.name)
        return None
    match = _ARTICLE_PATH.match(member.name)
    if match is None or not member.isfile():
        report.skip(member.name, "not an article file text/<genre>/<genre>-<id>.txt")
        return None
    try:
        text = tar.extractfile(member).read().decode("utf-8")
        return parse_article(match["genre"], match["id"], text)
    except (UnicodeDecodeError, ValueError) as err:
        report.skip(member.name, str(err))
        return None


def format_input(article: Article) -> str:
    """`"{title} {body}"`, normalised; the body's lines joined by spaces (one text per example)."""
    from data_prep.clean import normalize_neologdn  # here: pyarrow's kernels come with it, and job validation needs none

    title = normalize_neologdn(article.title).replace("\n", " ")
    body = normalize_neologdn(article.body).replace("\n", " ")
    return f"{title} {body}".strip()


def get_labels(genres: list[str], target: str) -> dict[str, str]:
    """genre -> the target text the model learns to write."""
    return {genre: str(index) if target == "index" else genre for index, genre in enumerate(sorted(genres))}


def split_articles(articles: list[Article], cfg: LivedoorSplitConfig) -> dict[str, list[Article]]:
    """train/valid/test by one seeded shuffle of the sorted articles (the same split everywhere).

    Test and valid sizes are rounded (7,367 x 0.15 -> 1,105); training takes the rest.
    """
    order = sorted(articles, key=lambda a: (a.genre, a.article_id))
    random.Random(cfg.seed).shuffle(order)
    num_test = round(len(order) * cfg.test_fraction)
    num_valid = round(len(order) * cfg.valid_fraction)
    test, valid, train = order[:num_test], order[num_test:num_test + num_valid], order[num_test + num_valid:]
    return {"train": train, "valid": valid, "test": test}


def build_examples(articles: list[Article], labels: dict[str, str]) -> list[Example]:
    return [Example(id=f"{a.genre}-{a.article_id}", input=format_input(a), target=labels[a.genre], label=a.genre)
            for a in articles]


@dataclass
class LivedoorTask:
    splits: dict[str, list[Example]]
    labels: dict[str, str]  # genre -> target text
    corpus: LivedoorCorpus


def build_livedoor_task(cfg: LivedoorConfig) -> LivedoorTask:
    """Read, split and format: the examples of each split, the label map and the read report."""
    corpus = read_livedoor(cfg.path)
    labels = get_labels(corpus.genres, cfg.target)
    splits = {name: build_examples(part, labels) for name, part in split_articles(corpus.articles, cfg).items()}
    return LivedoorTask(splits, labels, corpus)


INVALID = "<invalid>"


def parse_predictions(predictions: list[str], labels: dict[str, str]) -> list[str]:
    """Generated texts -> genres; text that is no label's target becomes INVALID (its own row)."""
    by_target = {target: genre for genre, target in labels.items()}
    return [by_target.get(text.strip(), INVALID) for text in predictions]


def evaluate_livedoor(examples: list[Example], predictions: list[str], labels: dict[str, str],
                      png_path: str | Path | None = None) -> ClassificationResult:
    """scikit-learn's classification report over the genres (+ the confusion matrix PNG)."""
    predicted = parse_predictions(predictions, labels)
    result = get_classification_result([e.label for e in examples], predicted, sorted(labels))
    result.metrics["num_invalid"] = predicted.count(INVALID)
    if png_path is not None:
        save_confusion_matrix_png(result, png_path, title="livedoor genre (rows: gold)")
    return result
