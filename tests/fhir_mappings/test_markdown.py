"""Untrusted text in card markdown renders as text: no link, image or HTML, with a real GFM renderer."""

from __future__ import annotations

import pytest
from markdown_it import MarkdownIt

from fhir_mappings.markdown import markdown_list
from fhir_mappings.markdown import md_text
from fhir_mappings.markdown import plain_text

# CommonMark with raw HTML on, GFM tables and strikethrough, bare URLs linkified: the most an EHR renders.
RENDERER = MarkdownIt("commonmark", {"html": True, "linkify": True}).enable(
    ["linkify", "table", "strikethrough"]
)

HOSTILE = [
    "[update your password](http://evil.test/login)",
    "![x](http://evil.test/pixel.png)",
    "<img src=x onerror=alert(1)>",
    "<a href='http://evil.test'>click</a>",
    "visit http://evil.test now",
    "or www.evil.test",
    "mail mailto:evil@evil.test now",
    "write to evil@evil.test",
    "call tel:+15551234 or xmpp:evil@evil.test",
    "javascript:alert(1)",
    "[ref]: http://evil.test",
    "**bold** _em_ `code` ~~gone~~",
    "# Heading",
    "- item",
    "1. item",
    "&lt;script&gt;",
    "a | b\n--|--\nc | d",
]


def render(text: str) -> str:
    return RENDERER.render(text)


@pytest.mark.parametrize("text", HOSTILE)
def test_untrusted_text_renders_as_one_paragraph_of_text(text: str) -> None:
    html = render(f"**Problem:** {md_text(text)}")
    body = html.removeprefix("<p><strong>Problem:</strong> ").removesuffix("</p>\n")
    assert "<" not in body.replace("&lt;", "").replace("<br", ""), html
    assert "<a " not in html and "<img" not in html


@pytest.mark.parametrize(
    "text", ["mail mailto:evil@evil.test now", "write to evil@evil.test", "javascript:alert(1)"]
)
def test_links_of_any_scheme_stay_text_a_gfm_renderer_would_link(text: str) -> None:
    # markdown-it's linkify leaves a bare address alone where GFM links it: the escaped text is checked too.
    escaped = md_text(text)
    assert "mailto:e" not in escaped and "@e" not in escaped and "javascript:a" not in escaped
    assert escaped.replace("\u2060", "") == text


@pytest.mark.parametrize("text", HOSTILE)
def test_untrusted_list_items_stay_list_items_of_text(text: str) -> None:
    html = render(markdown_list([text, "second"]))
    assert html.count("<li>") == 2 and "<a " not in html and "<img" not in html
    assert "<h1" not in html and "<ol" not in html and "<table" not in html


def test_plain_text_is_one_line_within_the_limit() -> None:
    assert plain_text("a\n\tb\x00c", 10) == "a bc"
    assert plain_text("x" * 200, 139) == "x" * 138 + "…"
