"""The gateway's redaction: no prefix of a key of 8+ characters survives any cut (issue 9.6)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from supervisor.gateway.redact import REDACTED, Redactor

KEY = "sk-0123456789abcdefghijklmnopqrstuvwxyz"
red = Redactor([KEY, "gm-other-key-42"])


def leaks(text: str) -> bool:
    return KEY[:8] in text


@given(pad=st.integers(0, 400), limit=st.integers(1, 400), before=st.text(max_size=20), after=st.text(max_size=20))
def test_clip_never_leaves_a_prefix_whatever_the_padding(pad: int, limit: int, before: str, after: str) -> None:
    out = red.clip(f"{before}x-pad={'A' * pad} authorization=Bearer {KEY}{after}", limit)
    assert len(out) <= max(limit, 3)
    assert not leaks(out)


@given(cut=st.integers(0, 200))
def test_a_read_limit_cut_mid_key_drops_the_partial_key(cut: int) -> None:
    body = (b"x" * 50 + b"Bearer " + KEY.encode() + b" tail")[:cut]
    out = red.truncated(body)
    assert KEY[:8].encode() not in out
    assert out == body[: len(out)] or REDACTED.encode() in out


def test_whole_keys_in_every_form_are_replaced() -> None:
    text = f"a {KEY} b {KEY.encode().hex()} c"
    assert red.text(text) == f"a {REDACTED} b {KEY.encode().hex()} c"
    assert red.clip(f"{KEY}", 300) == REDACTED
    assert red.data(b"1 gm-other-key-42 2") == f"1 {REDACTED} 2".encode()
    assert red.text('{"k": "a/b\\/c"}') == '{"k": "a/b\\/c"}'
    slashed = Redactor(["key/with/slash"])
    assert slashed.text('{"k": "key\\/with\\/slash"}') == '{"k": "' + REDACTED + '"}'
