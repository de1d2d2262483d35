"""MediaWiki wikitext -> plain prose, for Wikipedia dump pages (Japanese and English namespace names).

Kept: paragraph text, link labels, heading text (on its own line), list items (without their
markers), the contents of formatting tags. Dropped: templates, tables, references, comments,
files/images, categories, interlanguage links, magic words (`__TOC__`), math and code blocks.
Templates are dropped rather than expanded: expanding needs the whole wiki, and in article prose
they are mostly infoboxes, citations and maintenance tags.
"""
from __future__ import annotations

import html
import re

import mwparserfromhell
from mwparserfromhell.nodes import (
    Argument,
    Comment,
    ExternalLink,
    Heading,
    HTMLEntity,
    Node,
    Tag,
    Template,
    Text,
    Wikilink,
)
from mwparserfromhell.wikicode import Wikicode

# Namespace names (lower case) whose links are media or page metadata, not prose: jawiki accepts
# both the canonical English names and the Japanese aliases.
DROPPED_LINK_NAMESPACES = frozenset(
    {"file", "image", "media", "category", "ファイル", "画像", "メディア", "カテゴリ", "カテゴリー"}
)
# Tags whose contents are not prose (tables are tags too: wiki markup "{|").
DROPPED_TAGS = frozenset(
    {"ref", "references", "table", "gallery", "math", "chem", "ce", "timeline", "imagemap", "score",
     "graph", "templatedata", "mapframe", "maplink", "syntaxhighlight", "source", "hr", "noinclude"}
)
_INTERLANGUAGE_PREFIX = re.compile(r"[a-z]{2,3}(-[a-z]+)*")
# Behaviour switches: __TOC__, __NOTOC__, and jawiki's Japanese aliases such as __目次非表示__.
_MAGIC_WORD = re.compile(r"__(?:[A-Z]+|[^\x00-\x7f_\s]+)__")
_EMPTY_PARENS = re.compile(r"（[\s、,]*）|\([\s,]*\)")  # left behind by {{lang-en|...}} and the like
_MANY_NEWLINES = re.compile(r"\n{3,}")
_SPACE_RUN = re.compile(r"[ \t]{2,}")  # "; term : definition" leaves spaces where the markers were


def wikitext_to_text(wikitext: str) -> str:
    """Plain text of a page's wikitext; HTML entities decoded, at most one blank line in a row."""
    text = html.unescape(render(mwparserfromhell.parse(wikitext)))
    text = _EMPTY_PARENS.sub("", _MAGIC_WORD.sub("", text))
    lines = [_SPACE_RUN.sub(" ", line).strip(" \t") for line in text.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip("\n")


def render(code: Wikicode) -> str:
    return "".join(render_node(node) for node in code.nodes)


def render_node(node: Node) -> str:
    # Entities stay raw here and are decoded once at the end: decoding twice would turn the
    # wikitext "&amp;lt;" (shown as "&lt;") into "<".
    if isinstance(node, (Text, HTMLEntity)):
        return str(node)
    if isinstance(node, (Template, Comment, Argument)):
        return ""
    if isinstance(node, Wikilink):
        return render_wikilink(node)
    if isinstance(node, ExternalLink):
        return render_external_link(node)
    if isinstance(node, Heading):
        return render(node.title).strip()  # the newlines around it are Text nodes
    if isinstance(node, Tag):
        return render_tag(node)
    return ""


def render_wikilink(link: Wikilink) -> str:
    title = render(link.title).strip()
    visible = title.startswith(":")  # [[:Category:X]] links to the category page, shown inline
    prefix, has_prefix, _ = title.lstrip(":").partition(":")
    prefix = prefix.strip().lower()
    if has_prefix and not visible and prefix in DROPPED_LINK_NAMESPACES:
        return ""
    if link.text is not None and render(link.text).strip():
        return render(link.text)
    if has_prefix and not visible and _INTERLANGUAGE_PREFIX.fullmatch(prefix):
        return ""  # [[en:Cat]]: a link to another language edition, not shown in the text
    return title.lstrip(":")


def render_external_link(link: ExternalLink) -> str:
    if link.title is not None:
        return render(link.title)
    # A bare URL in running text is shown as written; an unlabelled [http://x] shows as "[1]".
    return "" if link.brackets else str(link.url)


def render_tag(tag: Tag) -> str:
    name = str(tag.tag).strip().lower()
    if name in DROPPED_TAGS:
        return ""
    if name == "br":
        return "\n"
    if tag.wiki_markup and name in ("li", "dt", "dd"):
        return " "  # list markers "*", "#", ";", ":"; the item text follows as a sibling node
    return render(tag.contents) if tag.contents is not None else ""
