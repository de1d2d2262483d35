"""data_prep.readers and data_prep.wikitext on real corpus layouts built from neko.txt (pure CPU, fast)."""
from __future__ import annotations

import gc
import html
import json
import tracemalloc

import pytest

from data_prep.readers import (
    TAPER_PARTS,
    RawDoc,
    Reject,
    detect_format,
    is_article,
    plan_splits,
    read_file,
    read_split,
)
from data_prep.wikitext import wikitext_to_text
from fixtures_corpus import (
    RICH_TEXT,
    build_wiki_pages,
    neko_documents,
    truncate_file,
    write_cc100_xz,
    write_empty,
    write_invalid_utf8,
    write_jsonl,
    write_long_line,
    write_oscar2019_gz,
    write_oscar_jsonl,
    write_text,
    write_wiki_xml,
    write_wikiextractor_jsonl,
)

TRUNCATED = "truncated or corrupt compressed stream"


def docs_of(items: list) -> list[RawDoc]:
    return [item for item in items if isinstance(item, RawDoc)]


def rejects_of(items: list) -> list[Reject]:
    return [item for item in items if isinstance(item, Reject)]


def read_in_splits(path, fmt, unit_bytes, **kwargs) -> tuple[list, int]:
    """(items of every split, in order; number of splits)."""
    splits = plan_splits(path, fmt, unit_bytes)
    return [item for start, end in splits for item in read_split(path, fmt, start, end, **kwargs)], len(splits)


def content(items: list) -> list[tuple]:
    """What must not depend on how a file was split (`where` does: line numbers vs byte offsets)."""
    return [
        ("doc", i.text, i.doc_id, i.title, i.num_bad_byte_lines) if isinstance(i, RawDoc) else ("reject", i.reason)
        for i in items
    ]


# --- format detection -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, write, expected",
    [
        ("jawiki-pages-articles.xml", lambda p: write_wiki_xml(p), "wikipedia_xml"),
        ("jawiki-multistream.xml.bz2", lambda p: write_wiki_xml(p, bz2=True, multistream=True), "wikipedia_xml"),
        ("dump.bin", lambda p: write_wiki_xml(p), "wikipedia_xml"),  # from its first line
        ("jawiki.json", write_wikiextractor_jsonl, "wikiextractor"),
        ("ja_dedup.txt.gz", write_oscar2019_gz, "oscar2019"),
        ("part_1.jsonl", lambda p: write_oscar_jsonl(p), "oscar"),
        ("part_1.jsonl.gz", lambda p: write_oscar_jsonl(p, "gz"), "oscar"),
        ("part_1.jsonl.zst", lambda p: write_oscar_jsonl(p, "zst"), "oscar"),
        ("ja.txt.xz", write_cc100_xz, "cc100"),
        ("corpus.txt", lambda p: write_text(p, neko_documents(3)), "text"),
        ("corpus.jsonl", lambda p: write_jsonl(p, [{"body": "x"}]), "jsonl"),
        ("empty.txt", write_empty, "text"),
    ],
)
def test_detect_format(tmp_path, name, write, expected):
    path = tmp_path / name
    write(path)
    assert detect_format(path) == expected


def test_detect_format_rejects_undecompressable_file(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(ValueError, match="broken.jsonl.gz"):
        detect_format(path)


@pytest.mark.parametrize("call", [
    detect_format,
    lambda p: plan_splits(p, "text", 10),
    lambda p: read_split(p, "text"),
    lambda p: read_file(p, "auto"),
])
def test_missing_file_raises_file_not_found(tmp_path, call):
    with pytest.raises(FileNotFoundError):
        call(tmp_path / "nope.txt")


# --- Wikipedia XML -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, bz2, multistream", [
    ("w.xml", False, False), ("w.xml.bz2", True, False), ("w-multistream.xml.bz2", True, True),
])
def test_wikipedia_xml_articles(tmp_path, name, bz2, multistream):
    path = tmp_path / name
    pages = write_wiki_xml(path, bz2=bz2, multistream=multistream)
    items = list(read_split(path, "auto"))
    articles = [p for p in pages if p.expected is not None]
    assert rejects_of(items) == []
    assert [(d.text, d.doc_id, d.title, d.where) for d in items] == [
        (p.expected, str(p.id), p.title, f"{path}:page={p.id}") for p in articles
    ]
    assert items[0].url.startswith("https://ja.wikipedia.org/wiki/%E5%90%BE")  # 吾輩は猫である_第1章
    assert items[0].url.endswith("_%E7%AC%AC1%E7%AB%A0")  # the space became "_", then quoted
    assert {"ねこ", "Wikipedia:執筆依頼"}.isdisjoint(d.title for d in items)  # redirect, ns 4


def test_rich_wikitext_page_becomes_prose(tmp_path):
    path = tmp_path / "w.xml"
    write_wiki_xml(path)
    (doc,) = [d for d in read_split(path, "wikipedia_xml") if d.doc_id == "5"]
    assert doc.text == RICH_TEXT
    assert doc.url == "https://ja.wikipedia.org/wiki/%E7%8C%AB"


def test_is_article():
    assert is_article("0", False) and is_article(0, False)
    assert not is_article("0", True) and not is_article("4", False) and not is_article(None, False)


def test_malformed_page_is_rejected_and_reading_goes_on(tmp_path):
    path = tmp_path / "w.xml.bz2"
    pages = write_wiki_xml(path, build_wiki_pages(malformed=True), bz2=True, multistream=True)
    items = list(read_split(path, "wikipedia_xml"))
    (reject,) = rejects_of(items)
    assert reject.where == f"{path}:page=8" and "malformed XML page" in reject.reason
    assert [d.doc_id for d in docs_of(items)] == [str(p.id) for p in pages if p.expected is not None]
    assert items.index(reject) == 3  # in file order, between the pages around it


def test_page_with_an_over_long_line_is_rejected(tmp_path):
    pages = build_wiki_pages(2)
    pages[0].wikitext = "長い" * 1000  # 6000 bytes on the line of its <text> tag
    path = tmp_path / "w.xml"
    write_wiki_xml(path, pages)
    items = list(read_split(path, "wikipedia_xml", max_line_bytes=5000))
    assert [(type(i).__name__, i.where) for i in items] == [
        ("Reject", f"{path}:page=10"), ("RawDoc", f"{path}:page=5"), ("RawDoc", f"{path}:page=11"),
    ]
    assert items[0].reason == "line longer than 5000 bytes"
    pages[0].wikitext = "長い" * 800  # 4800 bytes: no line too long, but more than 5000 in all
    write_wiki_xml(path, pages)
    items = list(read_split(path, "wikipedia_xml", max_line_bytes=5000))
    assert (items[0].where, items[0].reason) == (f"{path}:page=10", "page larger than 5000 bytes")


def test_unclosed_last_page_is_rejected(tmp_path):
    path = tmp_path / "w.xml"
    write_wiki_xml(path, build_wiki_pages(2))
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"</page>")])
    items = list(read_split(path, "wikipedia_xml"))
    assert [d.doc_id for d in docs_of(items)] == ["10", "5", "11"]
    assert [(r.where, r.reason) for r in rejects_of(items)] == [
        (f"{path}:page=7", "page not closed before the end of the file")
    ]


def test_bz2_multistream_splits_partition_pages(tmp_path):
    path = tmp_path / "jawiki-multistream.xml.bz2"
    write_wiki_xml(path, build_wiki_pages(9, malformed=True), bz2=True, multistream=True)
    whole = list(read_split(path, "wikipedia_xml"))
    for unit_bytes in (1, 1500, 4000, 10**9):
        items, num_splits = read_in_splits(path, "wikipedia_xml", unit_bytes)
        assert [(type(i), i.where) for i in items] == [(type(i), i.where) for i in whole]
        assert content(items) == content(whole)
        assert (num_splits > 1) == (unit_bytes < 10**9)


def test_single_stream_bz2_is_one_split(tmp_path):
    path = tmp_path / "single.xml.bz2"
    write_wiki_xml(path, bz2=True)
    assert plan_splits(path, "wikipedia_xml", 1) == [(0, None)]


@pytest.mark.parametrize("unit_bytes", [1, 7, 50, 333, 1000, 2500])
def test_uncompressed_xml_splits_partition_pages(tmp_path, unit_bytes):
    path = tmp_path / "w.xml"
    write_wiki_xml(path, build_wiki_pages(3, malformed=True))
    whole = list(read_split(path, "wikipedia_xml"))
    items, num_splits = read_in_splits(path, "wikipedia_xml", unit_bytes)
    assert num_splits > 1
    assert [(type(i), i.where) for i in items] == [(type(i), i.where) for i in whole]
    assert content(items) == content(whole)


# --- wikitext ---------------------------------------------------------------------------------


@pytest.mark.parametrize("wikitext, expected", [
    ("'''東京都'''（とうきょうと、{{lang-en|Tokyo Metropolis}}）は、[[日本]]の[[首都]]である。",
     "東京都（とうきょうと、）は、日本の首都である。"),
    ("{{Infobox 人物\n| 氏名 = 夏目漱石\n| 画像 = [[File:Natsume.jpg|200px]]\n}}\n'''夏目 漱石'''は作家。",
     "夏目 漱石は作家。"),
    ("作家である<ref>『漱石全集』</ref>。小説家<ref name=\"a\" />。<references />", "作家である。小説家。"),
    ("[[猫|ネコ]]と[[犬]]と[[:Category:動物|動物の分類]]", "ネコと犬と動物の分類"),
    ("[[ファイル:Cat.jpg|thumb|[[猫]]の写真]]本文[[画像:x.png]][[Image:y.png|left]]", "本文"),
    ("本文\n[[Category:日本の小説|わかはいはねこである]]\n[[カテゴリ:猫]]\n[[en:I Am a Cat]]", "本文"),
    ("[https://www.aozora.gr.jp/ 青空文庫]、[https://example.jp]、https://example.org/x",
     "青空文庫、、https://example.org/x"),
    ("== 概要 ==\n本文。\n=== 経歴 ===\n* 1867年 誕生\n** 江戸\n# 一\n; 用語 : 定義\n: 字下げ",
     "概要\n本文。\n経歴\n1867年 誕生\n江戸\n一\n用語 定義\n字下げ"),
    ("前\n{| class=\"wikitable\"\n|-\n! 年 !! 出来事\n|-\n| 1905 || 発表\n|}\n後", "前\n\n後"),
    ("a &amp;lt; b &amp; c &gt; d&nbsp;e", "a &lt; b & c > d\xa0e"),
    ("本文<!-- コメント -->です。__TOC__\n__NOTOC__\n__目次非表示__", "本文です。"),
    ("一\n\n\n\n\n二<br />三", "一\n\n二\n三"),
])
def test_wikitext_to_text(wikitext, expected):
    assert wikitext_to_text(wikitext) == expected


# --- JSON line formats ----------------------------------------------------------------------


def test_wikiextractor_jsonl(tmp_path):
    path = tmp_path / "AA_wiki_00.json"
    records = write_wikiextractor_jsonl(path)
    docs = list(read_split(path, "wikiextractor"))
    assert [(d.text, d.doc_id, d.title, d.url, d.where) for d in docs] == [
        (html.unescape(r["text"]), r["id"], r["title"], r["url"], f"{path}:{n}") for n, r in enumerate(records, 1)
    ]
    assert docs[0].text.endswith("式 a < b && c > d")


@pytest.mark.parametrize("compression", [None, "gz", "zst"])
def test_oscar_jsonl_with_metadata(tmp_path, compression):
    records = write_oscar_jsonl(tmp_path / "ja_meta_part_1.jsonl", compression)
    path = next(tmp_path.iterdir())
    docs = list(read_split(path, "oscar"))
    assert [(d.text, d.doc_id, d.url) for d in docs] == [
        (r["content"], r["warc_headers"]["warc-record-id"], r["warc_headers"]["warc-target-uri"]) for r in records
    ]
    assert [d.meta for d in docs[:4]] == [
        {"quality_warnings": ["tiny"], "categories": [], "harmful_pp": None, "lang_score": 0.75},
        {"quality_warnings": ["short_sentences", "header"], "categories": ["news"], "harmful_pp": 101.5,
         "lang_score": 0.76},
        {"quality_warnings": [], "categories": [], "harmful_pp": 102.5, "lang_score": 0.77},
        {"quality_warnings": [], "categories": ["news"], "harmful_pp": None, "lang_score": 0.78},
    ]


def test_oscar_malformed_lines_are_rejected_with_location(tmp_path):
    path = tmp_path / "o.jsonl"
    good = json.dumps({"content": "本文", "warc_headers": {}, "metadata": {}}, ensure_ascii=False)
    path.write_text("\n".join([good, '{"content": "切れ', json.dumps({"content": 3}), "", good]) + "\n")
    items = list(read_split(path, "oscar"))
    assert [(type(i).__name__, i.where) for i in items] == [
        ("RawDoc", f"{path}:1"), ("Reject", f"{path}:2"), ("Reject", f"{path}:3"), ("RawDoc", f"{path}:5"),
    ]
    assert "malformed JSON" in items[1].reason and "content" in items[2].reason
    assert items[0].meta == {"quality_warnings": [], "categories": [], "harmful_pp": None, "lang_score": None}


# --- paragraph formats ------------------------------------------------------------------------


@pytest.mark.parametrize("name, write, fmt", [
    ("ja.txt.gz", write_oscar2019_gz, "oscar2019"),
    ("ja.txt.xz", write_cc100_xz, "cc100"),
    ("ja.txt", lambda p: write_text(p, neko_documents(5)), "text"),
])
def test_paragraph_formats(tmp_path, name, write, fmt):
    path = tmp_path / name
    expected = write(path)
    docs = list(read_file(path, "auto"))
    assert [d.text for d in docs] == expected
    assert docs[0].where == f"{path}:1"
    assert docs[1].where == f"{path}:{expected[0].count(chr(10)) + 3}"


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    expected = write_invalid_utf8(path)
    docs = list(read_split(path, "text"))
    assert [d.text for d in docs] == expected
    assert [d.num_bad_byte_lines for d in docs] == [0, 1]


@pytest.mark.parametrize("name", ["e.txt", "e.jsonl", "e.txt.gz", "e.txt.xz", "e.jsonl.zst", "e.xml", "e.xml.bz2"])
def test_empty_file_yields_nothing(tmp_path, name):
    path = write_empty(tmp_path / name)
    assert list(read_split(path, "auto")) == []
    assert plan_splits(path, "auto", 10) == [(0, None)]


def write_tricky_text(path) -> bytes:
    """Documents with every separator a split boundary can land on: runs of blank lines,
    whitespace-only lines (ASCII and U+3000), CRLF, an over-long line (> 300 bytes) inside a
    document, invalid UTF-8, and a last line without a newline."""
    docs = ["\n".join(line[:30] for line in doc.split("\n")[:3]).encode() for doc in neko_documents(8, 1, 40)]
    data = (
        b"\n\n" + docs[0] + b"\n\n" + docs[1] + b"\n   \n\xe3\x80\x80\n\n\n" + docs[2].replace(b"\n", b"\r\n")
        + b"\r\n\r\n" + docs[3] + b"\n" + b"y" * 400 + b"\n" + docs[4] + b"\nbad \xff line\n\n" + docs[5]
        + b"\n\n" + b"z" * 700 + b"\n\n" + docs[6] + b"\n\n" + docs[7]
    )
    path.write_bytes(data)
    return data


def test_text_reader_on_tricky_separators(tmp_path):
    path = tmp_path / "t.txt"
    write_tricky_text(path)
    items = list(read_split(path, "text", max_line_bytes=300))
    kinds = [type(i).__name__ for i in items]
    assert kinds == ["RawDoc"] * 4 + ["Reject", "RawDoc", "RawDoc", "Reject", "RawDoc", "RawDoc"]
    assert [r.reason for r in rejects_of(items)] == ["line longer than 300 bytes"] * 2
    assert "\r" not in items[2].text and items[5].num_bad_byte_lines == 1


@pytest.mark.parametrize("unit_bytes", [1, 2, 3, 5, 17, 64, 100, 299, 301, 1000, 4096])
def test_text_splits_partition_documents(tmp_path, unit_bytes):
    path = tmp_path / "t.txt"
    data = write_tricky_text(path)
    whole = list(read_split(path, "text", max_line_bytes=300))
    items, num_splits = read_in_splits(path, "text", unit_bytes, max_line_bytes=300)
    assert num_splits >= -(-len(data) // unit_bytes)
    assert content(items) == content(whole)
    for item in items:  # "file@byte=N" points at the start of the record's first line
        offset = int(item.where.rpartition("@byte=")[2]) if "@byte=" in item.where else 0
        assert offset == 0 or data[offset - 1 : offset] == b"\n"


@pytest.mark.parametrize("size, unit_bytes", [(1000, 100), (1050, 100), (101, 100), (1000, 7), (10, 4)])
def test_splits_cover_the_file_and_taper_at_its_end(tmp_path, size, unit_bytes):
    """Cut every unit_bytes, the last unit_bytes in TAPER_PARTS: the workers end on small units."""
    path = tmp_path / "t.txt"
    path.write_bytes(b"x" * size)
    splits = plan_splits(path, "text", unit_bytes)
    starts = [start for start, _ in splits]
    assert starts[0] == 0 and [end for _, end in splits] == [*starts[1:], None]
    sizes = [b - a for a, b in zip(starts, [*starts[1:], size])]
    quarter = -(-unit_bytes // TAPER_PARTS)
    assert sizes[-TAPER_PARTS:] == [quarter] * (TAPER_PARTS - 1) + [unit_bytes - quarter * (TAPER_PARTS - 1)]
    assert all(0 < n <= unit_bytes for n in sizes) and sum(sizes) == size


def test_a_file_of_one_unit_is_not_cut(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"x" * 100)
    assert plan_splits(path, "text", 100) == [(0, None)]


@pytest.mark.parametrize("unit_bytes", [3, 10, 99, 256, 1000, 5000])
def test_jsonl_splits_partition_records(tmp_path, unit_bytes):
    path = tmp_path / "w.jsonl"
    records = write_wikiextractor_jsonl(path, num_docs=6)
    with open(path, "ab") as f:
        f.write(b'{"broken\r\n\n\n' + b'{"text": "' + b"w" * 9000 + b'"}\n{"text": "last", "id": 9}')
    whole = list(read_split(path, "wikiextractor", max_line_bytes=8000))
    assert [type(i).__name__ for i in whole] == ["RawDoc"] * len(records) + ["Reject", "Reject", "RawDoc"]
    items, num_splits = read_in_splits(path, "wikiextractor", unit_bytes, max_line_bytes=8000)
    assert num_splits > 1
    assert content(items) == content(whole)


# --- truncated and corrupt compressed files ---------------------------------------------------


def check_truncated(items: list, full_docs: list[str], min_docs: int = 1) -> None:
    """Earlier documents kept whole and in order, then exactly one Reject, last."""
    docs = docs_of(items)
    assert [d.text for d in docs] == full_docs[: len(docs)]
    assert min_docs <= len(docs) < len(full_docs)
    assert isinstance(items[-1], Reject) and TRUNCATED in items[-1].reason
    assert "@byte=" in items[-1].where
    assert len(rejects_of(items)) == 1


@pytest.mark.parametrize("name, write, fmt", [
    ("ja.txt.xz", write_cc100_xz, "cc100"),
    ("ja.txt.gz", write_oscar2019_gz, "oscar2019"),
    ("o.jsonl.gz", lambda p: [r["content"] for r in write_oscar_jsonl(p, "gz")], "oscar"),
    ("o.jsonl.zst", lambda p: [r["content"] for r in write_oscar_jsonl(p, "zst")], "oscar"),
    ("w.xml.bz2", lambda p: [pg.expected for pg in write_wiki_xml(p, bz2=True, multistream=True) if pg.expected],
     "wikipedia_xml"),
])
@pytest.mark.parametrize("keep_fraction", [0.5, 0.8])
def test_truncated_file_keeps_earlier_records(tmp_path, name, write, fmt, keep_fraction):
    path = tmp_path / name
    full_docs = write(path)
    truncate_file(path, keep_fraction)
    check_truncated(list(read_split(path, fmt)), full_docs)


def test_truncated_paragraph_file_drops_the_unfinished_document(tmp_path):
    path = tmp_path / "ja.txt.xz"
    full_docs = write_cc100_xz(path, num_docs=30)
    truncate_file(path, 0.5)
    items = list(read_split(path, "cc100"))
    check_truncated(items, full_docs)
    assert "dropped the unfinished document at" in items[-1].reason


def test_truncated_single_stream_bz2_is_one_reject(tmp_path):
    path = tmp_path / "w.xml.bz2"
    write_wiki_xml(path, bz2=True)
    truncate_file(path, 0.6)
    items = list(read_split(path, "auto"))
    assert len(items) == 1 and TRUNCATED in items[0].reason  # one bz2 block: nothing before the cut


def test_corrupt_gzip_middle_is_one_reject(tmp_path):
    path = tmp_path / "ja.txt.gz"
    full_docs = write_oscar2019_gz(path, num_docs=40)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    path.write_bytes(bytes(data))
    items = list(read_split(path, "oscar2019"))
    assert len(rejects_of(items)) == 1 and TRUNCATED in items[-1].reason
    assert [d.text for d in docs_of(items)] == full_docs[: len(docs_of(items))]


def test_multistream_dump_cut_at_a_stream_boundary_is_reported(tmp_path):
    path = tmp_path / "w.xml.bz2"
    pages = write_wiki_xml(path, bz2=True, multistream=True)
    last_stream = plan_splits(path, "wikipedia_xml", 1)[-1][0]  # the footer "</mediawiki>"
    truncate_file(path, last_stream / path.stat().st_size)
    items = list(read_split(path, "wikipedia_xml"))
    assert len(docs_of(items)) == sum(p.expected is not None for p in pages)
    assert [r.reason for r in rejects_of(items)] == ["dump ends without </mediawiki>: truncated?"]


def test_garbage_after_last_bz2_stream_is_rejected(tmp_path):
    path = tmp_path / "w.xml.bz2"
    pages = write_wiki_xml(path, bz2=True, multistream=True)
    with open(path, "ab") as f:
        f.write(b"not a bz2 stream")
    items = list(read_split(path, "wikipedia_xml"))
    assert len(docs_of(items)) == sum(p.expected is not None for p in pages)
    assert len(rejects_of(items)) == 1 and TRUNCATED in items[-1].reason


def test_compressed_file_cannot_be_read_from_the_middle(tmp_path):
    path = tmp_path / "ja.txt.gz"
    write_oscar2019_gz(path)
    assert plan_splits(path, "oscar2019", 10) == [(0, None)]
    with pytest.raises(ValueError, match="cannot be read from byte 10"):
        read_split(path, "oscar2019", 10, None)


# --- over-long lines ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, jsonl", [("long.txt", False), ("long.jsonl.gz", True), ("long.jsonl.zst", True)])
def test_50mb_line_is_rejected_in_bounded_memory(tmp_path, name, jsonl):
    path = tmp_path / name
    expected = write_long_line(path, 50 * 2**20, jsonl=jsonl)
    gc.collect()
    tracemalloc.start()
    try:
        items = list(read_split(path, "jsonl" if jsonl else "text", max_line_bytes=2**20))
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [type(i).__name__ for i in items] == ["RawDoc", "Reject", "RawDoc"]
    assert [d.text for d in docs_of(items)] == expected
    assert items[1].reason == f"line longer than {2**20} bytes"
    assert items[1].where == f"{path}:{2 if jsonl else expected[0].count(chr(10)) + 3}"
    assert peak_bytes < 40 * 2**20


def test_over_long_line_of_an_xml_dump_is_reported_once_whatever_the_splits(tmp_path):
    path = tmp_path / "w.xml"
    pages = build_wiki_pages(2)
    write_wiki_xml(path, pages)
    data = path.read_bytes()
    cut = data.index(b"  <page>")  # a one-line XML element between pages (not a real dump's layout)
    path.write_bytes(data[:cut] + b"<x>" + b"q" * 3000 + b"</x>\n" + data[cut:])
    whole = list(read_split(path, "wikipedia_xml", max_line_bytes=2000))
    assert (whole[0].where, whole[0].reason) == (f"{path}@byte={cut}", "line longer than 2000 bytes")
    assert [d.doc_id for d in docs_of(whole)] == ["10", "5"]  # page 11 has a line over 2000 bytes too
    for unit_bytes in (1, 100, 999, 1500):
        items, _ = read_in_splits(path, "wikipedia_xml", unit_bytes, max_line_bytes=2000)
        assert [(type(i), i.where) for i in items] == [(type(i), i.where) for i in whole]


@pytest.mark.parametrize("cut", ["mid_page", "between_pages", "before_end_tag"])
def test_cut_xml_dump_is_reported_once_whatever_the_splits(tmp_path, cut):
    path = tmp_path / "w.xml"
    write_wiki_xml(path, build_wiki_pages(3))
    data = path.read_bytes()
    size = {"mid_page": data.rindex(b"<text") + 20, "between_pages": data.rindex(b"  <page>"),
            "before_end_tag": data.rindex(b"</mediawiki>")}[cut]
    path.write_bytes(data[:size])
    whole = list(read_split(path, "wikipedia_xml"))
    assert len(rejects_of(whole)) == 1 and isinstance(whole[-1], Reject)
    for unit_bytes in (5, 64, 1000):
        items, _ = read_in_splits(path, "wikipedia_xml", unit_bytes)
        assert content(items) == content(whole)


@pytest.mark.parametrize("raw", [
    '{"id": 7, "text": "吾輩は猫である"}\n'.encode(),
    b'{"id": 123456789012345678901234567890, "text": "big id"}\n',  # orjson would read a float
    b'{"text": NaN}\n',  # json's extension
    b'{"text": "caf\xe9"}\n',  # invalid UTF-8: U+FFFD, flagged
    b'\n', b'  \r\n', '\u3000\n'.encode(),  # blank lines, also by Unicode's whitespace
    b'[1, 2]\n', b'{"text": "cut', b'{"text": "x"} trailing\n',
])
def test_json_lines_read_as_the_json_module_reads_them(raw):
    """The orjson fast path gives every line the json module's result."""
    from data_prep.readers import decode_line, load_json_line, load_json_object

    text, bad = decode_line(raw)
    expected = (load_json_object(text, "f:1") if text.strip() else None), bad
    got = load_json_line(raw, "f:1")
    assert repr(got) == repr(expected)  # repr: NaN != NaN


@pytest.mark.parametrize("raw, expected", [
    (b'{"text": "a\\ud800b"}', ({"text": "a\ufffdb"}, True)),
    (b'{"text": "x", "t": ["\\udc00"], "\\udfff": 1}', ({"text": "x", "t": ["\ufffd"], "\ufffd": 1}, True)),
    (b'{"text": "\\ud83d\\ude00", "n": NaN}', (None, False)),  # a pair is one character: not bad
])
def test_lone_surrogates_become_replacement_characters(raw, expected):
    """The json module reads a lone surrogate escape into a str that no UTF-8 writer accepts: it
    would have failed the whole unit. It is replaced and flagged, as invalid UTF-8 bytes are."""
    from data_prep.readers import load_json_line

    record, bad = load_json_line(raw, "f:1")
    if expected[0] is None:
        assert record["text"] == "\U0001f600" and not bad
    else:
        assert (record, bad) == expected
