"""Answers as Markdown, safely: markdown-it-py with raw HTML off, then nh3 (ammonia) as the last word.

A model writes the answers, so they are hostile input: `<script>`, `<img onerror=...>` and
`javascript:` links must come out as text or not at all. markdown-it already escapes raw HTML
and refuses javascript:/vbscript:/file:/data: links; nh3 then keeps only a small allow-list
of tags, no attributes beyond href/title, and only http(s)/mailto URLs, so a bug in either
layer alone does not open a hole. Images are dropped (they would fetch from the network).
"""

from __future__ import annotations

import nh3
from markdown_it import MarkdownIt

__all__ = ["MAX_MARKDOWN_CHARS", "render_markdown"]

MAX_MARKDOWN_CHARS = 200_000

_MD = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable(
    ["table", "strikethrough"]
)
_TAGS = {
    "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "del", "s", "code", "pre",
    "blockquote", "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip
_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}}
_SCHEMES = {"http", "https", "mailto"}


def render_markdown(text: str) -> str:
    """Safe HTML for untrusted Markdown (long texts are cut, and say so)."""
    cut = len(text) > MAX_MARKDOWN_CHARS
    html = _MD.render(text[:MAX_MARKDOWN_CHARS])
    clean = nh3.clean(
        html,
        tags=_TAGS,
        attributes=_ATTRIBUTES,
        url_schemes=_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )
    if cut:
        clean += f"<p><em>[cut at {MAX_MARKDOWN_CHARS:,} of {len(text):,} characters]</em></p>"
    return clean
