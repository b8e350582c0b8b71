"""`massgen-run report`: one run's page, frozen into a single self-contained HTML file.

No script and nothing external: the stylesheet is inlined and allowed by its hash in a
Content-Security-Policy meta tag that also forbids every fetch, so the file opens the same
in an air-gapped browser, a CI artifact viewer or an e-mail attachment.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from ._data import Redactor, RunIndex, load_detail, read_row
from ._render import page, run_page_body, static_text

__all__ = ["render_report", "write_report"]


def render_report(log_dir: Path, redact: Redactor | None = None) -> str:
    redact = redact or Redactor()
    css = static_text("dashboard.css")
    digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
    csp = f"default-src 'none'; style-src 'sha256-{digest}'; img-src data:; base-uri 'none'; form-action 'none'"
    index = RunIndex([log_dir.parent])
    row = read_row(log_dir)
    detail = load_detail(row, index, redact)
    body = run_page_body(detail, live_page=False)
    return page(f"{row.run_id} · massgen run report", body, inline_css=css, script=False, csp=csp)


def write_report(log_dir: Path, out: Path) -> Path:
    """Write the report atomically (temp file + rename) and return its path."""
    from ..logdir import atomic_write

    atomic_write(out, render_report(log_dir))
    return out
