"""Untrusted text (from the record or from the model) made safe to put in card markdown.

Card ``detail`` is GitHub-flavoured markdown that the EHR renders. Text from a note can carry a prompt
injection that makes the model write ``[update your password](https://...)`` or ``<img src=x>``: in a card
it must read as those characters, never become a link, an image or HTML. Only links the service builds
(``Link`` objects) may be links.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Any ASCII punctuation may be backslash-escaped in CommonMark (spec §2.4). Escaped anywhere: what opens
# emphasis, code, links and images, HTML and entities, strikethrough, tables and headings. Escaped at the
# start only: what makes the line a list item ("- ", "+ ", "1. ", "1) "), since texts land after "- ".
_MARKUP = re.compile(r"([\\`*_\[\]<>&~|#])")
_LIST_MARKER = re.compile(r"^(\d{1,9}(?=[.)])|)([-+.)])(?=\s|$)")
# GFM's autolink extension links bare "www.", "scheme://" and e-mail text, and linkify links "mailto:" (and
# other "scheme:") text, even written with escapes in some renderers (markdown-it's linkify works on the
# unescaped text); a word joiner (U+2060) keeps them text that reads the same.
_AUTOLINK = re.compile(r"(?i)(www)(\.)|(://)|(\b[a-z][a-z0-9+.\-]*:)(?=[^\s/])|(@)")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_BLANKS = re.compile(r"\s+")


def _break_autolink(match: re.Match[str]) -> str:
    www, dot, slashes, scheme, at = match.groups()
    if slashes:
        return ":\u2060//"
    if scheme or at:
        return f"{scheme or at}\u2060"
    return f"{www}\u2060{dot}"


def md_text(text: object) -> str:
    """Return ``text`` as markdown that renders as exactly that text, on one line, with no markup."""
    flat = _BLANKS.sub(" ", _CONTROL.sub("", str(text))).strip()
    escaped = _MARKUP.sub(r"\\\1", _AUTOLINK.sub(_break_autolink, flat))
    return _LIST_MARKER.sub(r"\1\\\2", escaped)


def plain_text(text: object, limit: int | None = None) -> str:
    """Return ``text`` on one line without control characters (for a card's plain-text ``summary``)."""
    flat = _BLANKS.sub(" ", _CONTROL.sub("", str(text))).strip()
    if limit is not None and len(flat) > limit:
        return flat[: limit - 1].rstrip() + "…"
    return flat


def markdown_list(items: Iterable[object]) -> str:
    """Return a markdown bullet list of untrusted texts (each escaped), or ``_none_``."""
    lines = [f"- {md_text(item)}" for item in items]
    return "\n".join(lines) if lines else "_none_"
