"""Small corpus files in the real formats (Wikipedia dumps, wikiextractor, OSCAR, CC-100), and corruptors.

Every writer builds its documents from data_prep/samples/neko.txt (吾輩は猫である, public domain),
writes the file at `path` (compressed as its arguments say) and returns what a reader should
give back, so a test can compare. Nothing here reads /work/shared.
"""
from __future__ import annotations

import bz2 as bz2_module
import gzip
import json
import lzma
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO
from xml.sax.saxutils import escape, quoteattr

import zstandard

NEKO = Path(__file__).resolve().parents[1] / "data_prep" / "samples" / "neko.txt"
WRITE_CHUNK_BYTES = 2**20
_WIKI_SPECIAL = re.compile(r"[\[\]{}|<>&'=*#:;_]")  # wikitext markup: keep plain fixture paragraphs plain


@lru_cache(maxsize=1)
def neko_blocks() -> tuple[str, ...]:
    """neko.txt's blank-line-separated blocks: each a few sentences, one per line."""
    text = NEKO.read_text(encoding="utf-8")
    return tuple(block.strip("\n") for block in text.split("\n\n") if block.strip())


def neko_documents(num_docs: int, blocks_per_doc: int = 2, first: int = 0) -> list[str]:
    """Documents of consecutive blocks, one sentence per line, no blank line inside."""
    blocks = neko_blocks()
    return [
        "\n".join(blocks[(first + i * blocks_per_doc + j) % len(blocks)] for j in range(blocks_per_doc))
        for i in range(num_docs)
    ]


def neko_paragraphs(num: int, first: int = 0) -> list[str]:
    """Blocks joined into one-line paragraphs, free of wikitext markup characters."""
    plain = [block.replace("\n", "") for block in neko_blocks() if not _WIKI_SPECIAL.search(block)]
    return [plain[(first + i) % len(plain)] for i in range(num)]


def open_for_write(path: Path) -> BinaryIO:
    """A binary writer that compresses by the file's suffix (.gz, .xz, .bz2, .zst) or not at all."""
    if path.suffix == ".gz":
        return gzip.open(path, "wb")
    if path.suffix == ".xz":
        return lzma.open(path, "wb")
    if path.suffix == ".bz2":
        return bz2_module.open(path, "wb")
    if path.suffix == ".zst":
        return zstandard.ZstdCompressor().stream_writer(open(path, "wb"), closefd=True)
    return open(path, "wb")


# --- plain text and JSON lines -------------------------------------------------------------


def write_text(path: Path, docs: list[str]) -> list[str]:
    """Paragraph-per-line text, a blank line between documents, compressed by suffix; returns docs."""
    with open_for_write(path) as f:
        f.write(("\n\n".join(docs) + "\n").encode("utf-8"))
    return docs


def write_jsonl(path: Path, records: list[dict]) -> list[dict]:
    """One JSON object per line, compressed by suffix; returns the records."""
    with open_for_write(path) as f:
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    return records


def write_oscar2019_gz(path: Path, num_docs: int = 12) -> list[str]:
    """OSCAR 2019 layout: gzip text, one paragraph per line, a blank line between documents."""
    return write_text(path, neko_documents(num_docs, first=100))


def write_cc100_xz(path: Path, num_docs: int = 12) -> list[str]:
    """CC-100 layout (ja.txt.xz): xz text, one paragraph per line, a blank line between documents."""
    return write_text(path, neko_documents(num_docs, first=200))


def write_wikiextractor_jsonl(path: Path, num_docs: int = 6) -> list[dict]:
    """`wikiextractor --json` lines. Each text ends with a line holding HTML entities, as
    wikiextractor leaves them: the reader should return `html.unescape(text)`."""
    records = [
        {
            "id": str(1000 + i),
            "revid": str(9000 + i),
            "url": f"https://ja.wikipedia.org/wiki?curid={1000 + i}",
            "title": f"吾輩は猫である 第{i + 1}節",
            "text": f"吾輩は猫である 第{i + 1}節\n\n{doc}\n式 a &lt; b &amp;&amp; c &gt; d",
        }
        for i, doc in enumerate(neko_documents(num_docs, first=300))
    ]
    return write_jsonl(path, records)


def oscar_record(i: int, content: str) -> dict:
    """An OSCAR 22.01+ record as the release writes it."""
    warnings = [["tiny"], ["short_sentences", "header"], None, []][i % 4]
    return {
        "content": content,
        "warc_headers": {
            "warc-record-id": f"<urn:uuid:00000000-0000-0000-0000-{i:012d}>",
            "warc-target-uri": f"https://example.jp/neko/{i}",
            "warc-date": "2022-01-20T12:00:00Z",
            "warc-type": "conversion",
            "content-length": str(len(content.encode("utf-8"))),
        },
        "metadata": {
            "identification": {"label": "ja", "prob": 0.75 + i / 100},
            "harmful_pp": None if i % 3 == 0 else 100.5 + i,
            "tlsh": None,
            "quality_warnings": warnings,
            "categories": ["news"] if i % 2 else None,
            "sentence_identifications": [{"label": "ja", "prob": 0.9}],
        },
    }


def write_oscar_jsonl(path: Path, compression: str | None = None, num_docs: int = 8) -> list[dict]:
    """OSCAR 22.01+ JSON lines; compression None, "gz" or "zst" (then appended to `path`'s name
    if missing). zstd output is flushed into a new block after every record, as streaming writers
    do, so that a truncated file still holds whole earlier records. Returns the records."""
    suffix = {None: "", "gz": ".gz", "zst": ".zst"}[compression]
    path = path if path.name.endswith(suffix) else path.with_name(path.name + suffix)
    records = [oscar_record(i, doc) for i, doc in enumerate(neko_documents(num_docs, first=400))]
    if compression != "zst":
        return write_jsonl(path, records)
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    with open(path, "wb") as f:
        for record in records:
            f.write(compressor.compress((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")))
            f.write(compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        f.write(compressor.flush())
    return records


# --- Wikipedia XML dumps --------------------------------------------------------------------

RICH_WIKITEXT = """{{Infobox 動物
| 名前 = 猫
| 画像 = [[ファイル:Neko.jpg|200px]]
}}
'''吾輩'''は[[猫]]である<ref name="s">夏目漱石『吾輩は猫である』</ref>。名前は''まだ''無い<ref name="t"/>。英語では'''Cat'''（{{lang-en|cat}}）。{{要出典|date=2024年1月}}
<!-- 編集者向けの注記 -->
__TOC__
== 概要 ==
[[主人|苦沙弥先生]]の家に住む。[[File:Cat.svg|thumb|猫の[[絵]]]]
{| class="wikitable"
! 名前 !! 職業
|-
| 苦沙弥 || 教師
|}
=== 登場人物 ===
* [[迷亭]]
* 寒月
# 第一話
; 吾輩 : 猫
A &amp; B &lt; C、詳細は[https://www.aozora.gr.jp 青空文庫]を参照。
[[Category:猫]]
[[カテゴリ:日本の小説]]
[[画像:Neko2.png|thumb]]"""

RICH_TEXT = """吾輩は猫である。名前はまだ無い。英語ではCat。

概要
苦沙弥先生の家に住む。

登場人物
迷亭
寒月
第一話
吾輩 猫
A & B < C、詳細は青空文庫を参照。"""


@dataclass
class WikiPage:
    """A dump page; `expected` is the text the reader should give, None when it yields no doc."""

    id: int
    title: str
    wikitext: str
    ns: int = 0
    redirect: str | None = None  # target title of a redirect page
    expected: str | None = None
    malformed: bool = False  # written as broken XML: the reader rejects it


def build_wiki_pages(num_articles: int = 5, malformed: bool = False) -> list[WikiPage]:
    """Plain neko articles, one article with rich wikitext (templates, tables, refs, links, headings,
    lists), a redirect, a project page (ns 4) and, if asked, a malformed page in the middle."""
    pages = []
    for i in range(num_articles):
        paragraphs = neko_paragraphs(3, first=3 * i)
        pages.append(WikiPage(10 + i, f"吾輩は猫である 第{i + 1}章", "\n\n".join(paragraphs),
                              expected="\n\n".join(paragraphs)))
    pages.insert(1, WikiPage(5, "猫", RICH_WIKITEXT, expected=RICH_TEXT))
    pages.insert(3, WikiPage(6, "ねこ", "#転送 [[猫]]", redirect="猫"))
    pages.insert(4, WikiPage(7, "Wikipedia:執筆依頼", "猫の記事を書いてください。", ns=4))
    if malformed:
        pages.insert(5, WikiPage(8, "壊れたページ", "", malformed=True))
    return pages


def write_wiki_xml(path: Path, pages: list[WikiPage] | None = None, bz2: bool = False,
                   multistream: bool = False) -> list[WikiPage]:
    """A MediaWiki export (schema 0.11) of `pages` (default build_wiki_pages()): plain XML, one bz2
    stream, or multistream as the real dumps: a header stream, one stream per 2 pages, a footer
    stream. Returns the pages."""
    pages = build_wiki_pages() if pages is None else pages
    pieces = [DUMP_HEADER.encode()]
    pieces += ["".join(page_xml(p) for p in pages[i : i + 2]).encode() for i in range(0, len(pages), 2)]
    pieces.append(b"</mediawiki>\n")
    if multistream:
        data = b"".join(bz2_module.compress(piece) for piece in pieces)
    else:
        data = b"".join(pieces)
        data = bz2_module.compress(data) if bz2 else data
    path.write_bytes(data)
    return pages


DUMP_HEADER = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:schemaLocation="http://www.mediawiki.org/xml/export-0.11/ http://www.mediawiki.org/xml/export-0.11.xsd" version="0.11" xml:lang="ja">
  <siteinfo>
    <sitename>Wikipedia</sitename>
    <dbname>jawiki</dbname>
    <base>https://ja.wikipedia.org/wiki/%E3%83%A1%E3%82%A4%E3%83%B3%E3%83%9A%E3%83%BC%E3%82%B8</base>
    <generator>MediaWiki 1.42.0-wmf.5</generator>
    <case>first-letter</case>
    <namespaces>
      <namespace key="0" case="first-letter" />
      <namespace key="4" case="first-letter">Wikipedia</namespace>
    </namespaces>
  </siteinfo>
"""


def page_xml(page: WikiPage) -> str:
    """One `<page>` element as the dump writes it: one tag per line, text XML-escaped."""
    if page.malformed:  # an undefined entity and an unclosed <b>: not well-formed XML
        text = "閉じていない &bogus; 要素<b>"
    else:
        text = escape(page.wikitext)
    redirect = f"    <redirect title={quoteattr(page.redirect)} />\n" if page.redirect else ""
    return (
        f"  <page>\n    <title>{escape(page.title)}</title>\n    <ns>{page.ns}</ns>\n    <id>{page.id}</id>\n"
        f"{redirect}    <revision>\n      <id>{page.id + 5000}</id>\n"
        f"      <timestamp>2024-01-01T00:00:00Z</timestamp>\n"
        f"      <contributor>\n        <username>Neko</username>\n        <id>1</id>\n      </contributor>\n"
        f"      <model>wikitext</model>\n      <format>text/x-wiki</format>\n"
        f'      <text bytes="{len(page.wikitext.encode())}" xml:space="preserve">{text}</text>\n'
        f"      <sha1>0</sha1>\n    </revision>\n  </page>\n"
    )


# --- corruptors -----------------------------------------------------------------------------


def truncate_file(path: Path, keep_fraction: float) -> int:
    """Cut the file to its first `keep_fraction` of bytes, as an interrupted download; returns the size."""
    size = int(path.stat().st_size * keep_fraction)
    with open(path, "r+b") as f:
        f.truncate(size)
    return size


def write_invalid_utf8(path: Path) -> list[str]:
    """Text with one line of invalid UTF-8 in its second document; returns the docs as a reader
    decodes them (U+FFFD for each bad byte)."""
    first, second = neko_documents(2, first=500)
    data = first.encode() + b"\n\n" + second.encode() + b"\nbad \xff\xfe bytes\n"
    path.write_bytes(data)
    return [first, second + "\nbad \ufffd\ufffd bytes"]


def write_long_line(path: Path, n_bytes: int, jsonl: bool = False) -> list[str]:
    """A document, a single line of `n_bytes` bytes, a document; written in 1 MiB pieces (never held
    whole), compressed by suffix. With jsonl, JSON lines {"text": ...} (the long line one huge
    record). Returns the texts of the two short documents."""
    docs = neko_documents(2, first=600)
    with open_for_write(path) as f:
        f.write(_record(docs[0], jsonl))
        if jsonl:
            f.write(b'{"text": "')
        for _ in range(n_bytes // WRITE_CHUNK_BYTES):
            f.write(b"x" * WRITE_CHUNK_BYTES)
        f.write(b"x" * (n_bytes % WRITE_CHUNK_BYTES) + (b'"}\n' if jsonl else b"\n\n"))
        f.write(_record(docs[1], jsonl))
    return docs


def _record(text: str, jsonl: bool) -> bytes:
    if jsonl:
        return (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode()
    return (text + "\n\n").encode()


def write_empty(path: Path) -> Path:
    """A zero-byte file (or an empty compressed stream, by suffix)."""
    with open_for_write(path):
        pass
    return path
