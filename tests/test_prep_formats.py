"""`t5ja prep` end to end over every corpus format and every bad-input case at once, through
the real CLI: formats detected, bad records logged with their location, the run completes."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pytest

from data_prep import layout
from data_prep.shards import list_shards

import fixtures_corpus as fx
from conftest import ROOT


@pytest.fixture(scope="module")
def prepped(tmp_path_factory, neko_data):
    corpus = tmp_path_factory.mktemp("corpus")
    expected = {
        "wiki": fx.write_wiki_xml(corpus / "jawiki-20240101-pages-articles-multistream.xml.bz2",
                                  fx.build_wiki_pages(malformed=True), multistream=True),
        "wikiextractor": fx.write_wikiextractor_jsonl(corpus / "wiki_00.jsonl"),
        "oscar": fx.write_oscar_jsonl(corpus / "ja_meta_part_1.jsonl", compression="zst"),
        "oscar2019": fx.write_oscar2019_gz(corpus / "ja_dedup.txt.gz"),
        "cc100": fx.write_cc100_xz(corpus / "ja.txt.xz", num_docs=40),
    }
    fx.write_cc100_xz(corpus / "truncated.txt.xz", num_docs=40)
    fx.truncate_file(corpus / "truncated.txt.xz", 0.5)
    fx.write_invalid_utf8(corpus / "invalid.txt")
    fx.write_empty(corpus / "empty.txt")
    fx.write_long_line(corpus / "long.txt", 50 * 2**20)
    names = ["jawiki-*.xml.bz2", "wiki_00.jsonl", "ja_meta_part_1.jsonl.zst", "ja_dedup.txt.gz", "ja.txt.xz",
             "truncated.txt.xz", "invalid.txt", "empty.txt", "long.txt"]
    inputs = "\n".join(f"    - {{path: {corpus / name}}}" for name in names)
    job = corpus / "job.yaml"
    job.write_text(f"""name: formats
data:
  inputs:
{inputs}
  output_dir: {corpus / 'out'}
  max_line_bytes: 1048576
  max_rejected_share: 0.5
  unit_bytes: 8388608
  filters: {{oscar_drop_warnings: [tiny]}}
tokenizer: {{path: {layout.tokenizer_dir(neko_data)}}}
objective: {{input_length: 64}}
""")
    result = subprocess.run([sys.executable, "-m", "launcher.cli", "prep", str(job), "--workers", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = corpus / "out"
    manifest = json.loads((layout.docs_dir(out) / "manifest.json").read_text())
    rejects = [json.loads(line) for line in (layout.docs_dir(out) / "rejects.jsonl").read_text().splitlines()]
    rows = [r for shard in list_shards(layout.docs_dir(out))
            for r in pa.ipc.open_stream(pa.memory_map(str(shard))).read_all().to_pylist()]
    return expected, manifest, rejects, rows, result.stdout


def by_input(manifest: dict) -> list[dict]:
    return sorted(manifest["inputs"], key=lambda e: e["input"])


def test_formats_are_detected(prepped):
    _, manifest, _, _, _ = prepped
    formats = [e["format"] for e in by_input(manifest)]
    assert formats == ["wikipedia_xml", "wikiextractor", "oscar", "oscar2019", "cc100", "text", "text", "text",
                       "text"]


def test_wikipedia_articles_only_with_ids_titles_urls(prepped):
    expected, manifest, _, rows, _ = prepped
    wiki = [r for r in rows if r["source"] == "jawiki-20240101-pages-articles-multistream"]
    articles = [p for p in expected["wiki"] if p.expected is not None]
    assert [r["title"] for r in wiki] == [p.title for p in articles]  # no redirect, no ns 4 page
    assert wiki[0]["url"].startswith("https://ja.wikipedia.org/wiki/")
    assert all("{{" not in r["text"] and "[[" not in r["text"] and "<ref" not in r["text"] for r in wiki)


def test_oscar_metadata_columns_and_quality_filter(prepped):
    expected, manifest, _, rows, _ = prepped
    oscar = [r for r in rows if r["source"] == "ja_meta_part_1"]
    tiny = [rec for rec in expected["oscar"] if "tiny" in (rec["metadata"]["quality_warnings"] or [])]
    assert by_input(manifest)[2]["dropped"]["quality_warning"] == len(tiny)
    assert len(oscar) == len(expected["oscar"]) - len(tiny)
    assert any(r["quality_warnings"] == ["short_sentences", "header"] for r in oscar)
    assert all(r["url"].startswith("https://example.jp/neko/") and r["lang_score"] > 0.7 for r in oscar)


def test_bad_inputs_are_logged_with_location_and_the_run_completes(prepped):
    _, manifest, rejects, _, stdout = prepped
    inputs = by_input(manifest)
    where = {r["input"]: r for r in rejects}
    assert [r["where"].rsplit(":", 1)[1] for r in rejects if r["input"] == 0] == ["page=8"]  # the malformed page
    assert "truncated or corrupt" in where[5]["reason"] and "@byte=" in where[5]["where"]
    # The good records before the cut are read; they repeat ja.txt.xz's, so global dedup drops them.
    assert inputs[5]["num_docs_in"] > 0 and inputs[5]["dropped"]["duplicate"] == inputs[5]["num_docs_in"]
    assert inputs[6]["num_bad_byte_lines"] == 1
    assert inputs[7]["num_docs_in"] == 0 and inputs[7]["num_rejected"] == 0
    assert "longer than 1048576 bytes" in where[8]["reason"] and inputs[8]["num_docs_out"] == 2
    assert manifest["totals"]["num_rejected"] == len(rejects)


def test_shards_record_their_inputs_and_the_summary_is_printed(prepped):
    _, manifest, _, rows, stdout = prepped
    assert sorted({i for s in manifest["shards"] for i in s["inputs"]}) == [0, 1, 2, 3, 4, 6, 8]
    assert sum(s["rows"] for s in manifest["shards"]) == len(rows) == manifest["totals"]["num_docs_out"]
    assert manifest["totals"]["throughput_mb_s"] > 0
    assert "docs: " in stdout and "tokens: " in stdout
