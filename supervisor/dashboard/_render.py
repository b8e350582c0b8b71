"""HTML for the runs page and the run page (live and frozen), with hand-written inline SVG charts.

Every string that came from a log dir goes through `esc` (or `render_markdown` for answers);
nothing here emits a `style` attribute, inline script or event handler, so the pages work
under a CSP without 'unsafe-inline' (colours are CSS classes, geometry SVG attributes).
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable
from importlib import resources
from typing import Any

from ..runrows import RunRow
from ._data import BatchRow, Mark, RunDetail, UsagePoint
from ._markdown import render_markdown


def static_text(name: str) -> str:
    """A file of the dashboard's static/ folder (the stylesheet is inlined in reports too)."""
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


__all__ = ["SECTIONS", "esc", "page", "run_page_body", "run_row_html", "run_sections", "runs_page_body"]

SECTIONS = ("head", "agents", "timeline", "usage", "answers", "children", "container", "result")
PALETTE = 8
MAX_ANSWERS_SHOWN = 40  # the newest; a page re-sent on every change must stay a sane size
LIVE_STATES = ("queued", "starting", "running")


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt_time(ts: float | None) -> str:
    if not ts:
        return ""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
    except (OverflowError, OSError, ValueError):
        return ""


def fmt_dur(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s) // 60}m{int(s) % 60:02d}s"
    return f"{int(s) // 3600}h{int(s) % 3600 // 60:02d}m"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""  # pragma: no cover


def fmt_cost(c: float) -> str:
    return f"${c:.6f}" if c < 1 else f"${c:,.2f}"


def state_badge(row: RunRow) -> str:
    kind = row.state
    if row.finished:
        kind = "ok" if row.exit_code == 0 else {3: "timeout", 4: "stopped"}.get(row.exit_code or -1, "failed")
    text = row.state if not row.finished or row.exit_code is None else f"finished ({row.exit_code})"
    return f'<span class="badge b-{esc(kind)}">{esc(text)}</span>'


def page(
    title: str,
    body: str,
    *,
    inline_css: str | None = None,
    script: bool = True,
    meta: dict[str, str] | None = None,
    csp: str | None = None,
) -> str:
    """A whole document: live pages link /static assets; a report inlines its CSS (CSP by hash)."""
    head = ['<meta charset="utf-8">', '<meta name="viewport" content="width=device-width, initial-scale=1">']
    if csp:
        head.append(f'<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">')
    head.append('<meta name="referrer" content="no-referrer">')
    for k, v in (meta or {}).items():
        head.append(f'<meta name="{esc(k)}" content="{esc(v)}">')
    head.append(f"<title>{esc(title)}</title>")
    if inline_css is not None:
        head.append(f"<style>{inline_css}</style>")
    else:
        head.append('<link rel="stylesheet" href="/static/dashboard.css">')
        head.append('<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">')
    if script:
        head.append('<script src="/static/dashboard.js" defer></script>')
    return f'<!doctype html>\n<html lang="en">\n<head>{"".join(head)}</head>\n<body>\n{body}\n</body>\n</html>\n'


def topbar(crumb: str = "", live: bool = True) -> str:
    dot = '<span id="live" class="live" title="live updates">connecting</span>' if live else ""
    home = '<a href="/">massgen runs</a>' if live else "<span>massgen run report</span>"
    return f'<header class="top"><span class="logo">&#9670;</span> {home}{crumb} {dot}</header>'


# -- runs page ---------------------------------------------------------------------------------


def run_row_html(row: RunRow, root_id: str, now: float) -> str:
    age = now - row.start_time if row.start_time else None
    indent = "".join('<span class="ind"></span>' for _ in range(min(row.depth, 8)))
    nested = '<span class="tree">&#8627;</span>' if row.depth else ""
    exit_ = "" if row.exit_code is None else str(row.exit_code)
    cpu = "" if row.cpu_percent is None or row.finished else f"{row.cpu_percent:.0f}%"
    mem = "" if row.memory_bytes is None or row.finished else fmt_bytes(row.memory_bytes)
    agents = ", ".join(row.agents)
    cells = [
        (row.run_id, f'{indent}{nested}<a href="/run/{esc(row.run_id)}">{esc(row.run_id)}</a>'),
        (row.state + str(row.exit_code), state_badge(row)),
        (row.phase or "", esc(row.phase or "")),
        (row.start_time or 0, f'<span class="age" data-start="{row.start_time or ""}">{esc(fmt_dur(age))}</span>'),
        (agents, esc(agents)),
        (row.winner or "", esc(row.winner or "")),
        (-1 if row.exit_code is None else row.exit_code, esc(exit_)),
        (row.reason or "", esc(row.reason or "")),
        (row.tokens, f"{row.tokens:,}" if row.tokens else ""),
        (row.cost_usd, fmt_cost(row.cost_usd) if row.cost_usd else ""),
        (row.cpu_percent or 0, esc(cpu)),
        (row.memory_bytes or 0, esc(mem)),
        (row.depth, str(row.depth)),
    ]
    tds = "".join(f'<td data-v="{esc(v)}">{h}</td>' for v, h in cells)
    search = " ".join((row.run_id, row.state, row.phase or "", row.reason or "", agents, row.question)).lower()
    attrs = (
        f'id="r-{esc(row.run_id)}" data-run="{esc(row.run_id)}" data-root="{esc(root_id)}"'
        f' data-parent="{esc(row.parent_run_id or "")}" data-depth="{row.depth}" data-state="{esc(row.state)}"'
        f' data-exit="{esc(exit_)}" data-search="{esc(search)}"'
    )
    title = f' title="{esc(row.question)}"' if row.question else ""
    return f"<tr {attrs}{title}>{tds}</tr>"


def batch_row_html(b: BatchRow) -> str:
    c = b.counts
    kind = b.state
    if b.state == "finished":
        kind = "ok" if b.exit_code == 0 else {3: "timeout", 4: "stopped"}.get(b.exit_code or -1, "failed")
    state = b.state if b.exit_code is None else f"{b.state} ({b.exit_code})"
    if b.stopping and b.state != "finished":
        state += f", stopping: {b.stopping}"
    eta = f"ETA {fmt_dur(b.eta_s)}" if b.eta_s is not None and b.state != "finished" else ""
    cells = (
        f'<td title="{esc(b.batch_dir)}">{esc(b.name)}</td>',
        f'<td><span class="badge b-{esc(kind)}">{esc(state)}</span></td>',
        f'<td><progress max="{max(b.items, 1)}" value="{min(b.done, b.items)}"></progress> {b.done}/{b.items}</td>',
        f'<td class="n-pass">{c.get("pass", 0)}</td><td class="n-fail">{c.get("fail", 0)}</td>',
        f"<td>{c.get('error', 0)}</td><td>{c.get('skipped', 0)}</td><td>{c.get('running', 0)}</td>",
        f"<td>{c.get('pending', 0)}</td><td>{esc(fmt_cost(b.cost_usd) if b.cost_usd else '')}</td>",
        f"<td>{esc(fmt_dur(b.elapsed_s))}</td><td>{esc(eta)}</td>",
    )
    return f'<tr id="{esc(b.key)}" data-state="{esc(b.state)}">{"".join(cells)}</tr>'


def batches_html(batches: list[BatchRow]) -> str:
    heads = "".join(
        f"<th>{h}</th>"
        for h in ("Batch", "State", "Progress", "Pass", "Fail", "Error", "Skipped", "Running", "Pending", "Cost")
    )
    rows = "\n".join(batch_row_html(b) for b in batches)
    return (
        f'<section id="batches" class="batches"{"" if batches else " hidden"}><h2>Batches</h2>'
        f'<table class="grid"><thead><tr>{heads}<th>Elapsed</th><th></th></tr></thead>'
        f'<tbody id="batches-body">{rows}</tbody></table></section>'
    )


RUN_COLUMNS = (
    "Run",
    "State",
    "Phase",
    "Age",
    "Agents",
    "Winner",
    "Exit",
    "Reason",
    "Tokens",
    "Cost",
    "CPU",
    "Mem",
    "Depth",
)


def runs_page_body(rows: list[tuple[RunRow, str]], gen: int, now: float, batches: list[BatchRow] | None = None) -> str:
    live = sum(1 for r, _ in rows if r.live)
    failed = sum(1 for r, _ in rows if r.finished and r.exit_code not in (0, None))
    heads = "".join(f'<th data-col="{i}" tabindex="0">{esc(c)}</th>' for i, c in enumerate(RUN_COLUMNS))
    body = "\n".join(run_row_html(r, root, now) for r, root in rows)
    states = "".join(
        f'<option value="{v}">{t}</option>'
        for v, t in (
            ("", "all states"),
            ("live", "live"),
            ("finished", "finished"),
            ("ok", "succeeded"),
            ("bad", "failed / stopped / timed out"),
        )
    )
    return f"""{topbar()}
<main>
<div class="bar">
  <h1>Runs</h1>
  <span class="counts" id="counts"><b id="n-live">{live}</b> live · <b id="n-all">{len(rows)}</b> total ·
   <b id="n-failed">{failed}</b> failed</span>
  <input id="filter" type="search" placeholder="filter: id, state, reason, agent, question" aria-label="filter">
  <select id="state" aria-label="state">{states}</select>
  <label class="chk"><input id="flat" type="checkbox"> flat</label>
</div>
{batches_html(batches or [])}
<table class="runs" id="runs" data-gen="{gen}">
<thead><tr>{heads}</tr></thead>
<tbody id="runs-body">
{body}
</tbody>
</table>
<p class="empty" id="empty"{"" if not rows else " hidden"}>No runs under the logs root yet.</p>
</main>"""


# -- run page ----------------------------------------------------------------------------------


def _colors(names: Iterable[str]) -> dict[str, int]:
    return {n: i % PALETTE for i, n in enumerate(names)}


def _fact(name: str, value: str) -> str:
    return f"<div><dt>{esc(name)}</dt><dd>{value}</dd></div>" if value else ""


def _head(d: RunDetail, can_stop: bool, live_page: bool) -> str:
    r = d.row
    run = d.status.get("run") if isinstance(d.status.get("run"), dict) else {}
    assert isinstance(run, dict)
    parent = ""
    if r.parent_run_id:
        parent = (
            f'<a href="/run/{esc(r.parent_run_id)}">{esc(r.parent_run_id)}</a>' if live_page else esc(r.parent_run_id)
        )
    stop = ""
    if can_stop and live_page and r.live:
        stop = (
            f'<form class="stop" method="post" action="/run/{esc(r.run_id)}/stop" id="stop-form">'
            '<button type="submit" id="stop">Stop run</button></form>'
        )
    facts = "".join(
        (
            _fact("state", state_badge(r)),
            _fact("phase", esc(f"{r.phase or ''} {'' if r.percent is None else f'{r.percent}%'}".strip())),
            _fact("exit", esc("" if r.exit_code is None else r.exit_code)),
            _fact("reason", esc(r.reason or "")),
            _fact("detail", esc(run.get("detail") or "")),
            _fact("winner", esc(r.winner or "")),
            _fact("started", esc(fmt_time(r.start_time))),
            _fact("elapsed", esc(fmt_dur(r.elapsed_s))),
            _fact("tokens", f"{r.tokens:,}"),
            _fact("cost", esc(fmt_cost(r.cost_usd))),
            _fact("sandbox", esc(r.sandbox or "")),
            _fact("depth", str(r.depth)),
            _fact("parent", parent),
        )
    )
    q = f'<p class="question">{esc(r.question)}</p>' if r.question else ""
    return f'<div class="titlebar"><h1>{esc(r.run_id)}</h1>{stop}</div>{q}<dl class="facts">{facts}</dl>'


def _agents(d: RunDetail) -> str:
    if not d.agents:
        return "<h2>Agents</h2><p class='empty'>No agents yet.</p>"
    colors = _colors(d.agents)
    rows = []
    by_agent = d.status.get("telemetry", {}).get("by_agent", {}) if isinstance(d.status.get("telemetry"), dict) else {}
    for aid, a in d.agents.items():
        vote = a.get("vote_cast") if isinstance(a.get("vote_cast"), dict) else None
        vote_s = f"{vote.get('voted_for_agent', '')} ({vote.get('voted_for_label') or ''})" if vote else ""
        err = a.get("error") if isinstance(a.get("error"), dict) else None
        err_s = f"{err.get('type', '')}: {err.get('message', '')}" if err else ""
        use = by_agent.get(aid) if isinstance(by_agent, dict) else None
        use = use if isinstance(use, dict) else {}
        model = "/".join(str(x) for x in (a.get("backend"), a.get("model")) if x)
        tokens = f"{int(use.get('total_tokens') or 0):,}" if use else ""
        cost = esc(fmt_cost(float(use.get("cost_usd") or 0.0))) if use else ""
        rows.append(
            f'<tr><td><span class="sw c{colors[aid]}"></span>{esc(aid)}</td><td>{esc(a.get("anon", ""))}</td>'
            f"<td>{esc(model)}</td><td>{esc(a.get('status', ''))}</td><td>{esc(a.get('answer_count', ''))}</td>"
            f"<td>{esc(a.get('turns', ''))}</td><td>{esc(a.get('errors', ''))}</td><td>{esc(vote_s)}</td>"
            f"<td>{tokens}</td><td>{cost}</td>"
            f'<td class="err">{esc(err_s)}</td></tr>'
        )
    return (
        "<h2>Agents</h2><table class='grid'><thead><tr><th>agent</th><th>anon</th><th>model</th><th>status</th>"
        "<th>answers</th><th>turns</th><th>errors</th><th>vote</th><th>tokens</th><th>cost</th><th>last error</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _ticks(span: float, n: int = 6) -> list[float]:
    if span <= 0:
        return [0.0]
    raw = span / n
    step = next((s for s in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600) if s >= raw), 7200)
    out, t = [], 0.0
    while t <= span + 1e-9:
        out.append(round(t, 3))
        t += step
    return out


W, LABEL_W, PAD_R = 1000, 130, 16
LANE_H = 34

MARK_KINDS = ("answer", "vote", "restart", "tool", "model", "error", "failed", "winner", "final")


def _mark_shape(m: Mark, x: float, y: float) -> str:
    k = m.kind
    if k == "answer":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6"/>'
    if k == "vote":
        return f'<polygon points="{x:.1f},{y - 7:.1f} {x + 7:.1f},{y:.1f} {x:.1f},{y + 7:.1f} {x - 7:.1f},{y:.1f}"/>'
    if k == "restart":
        return f'<polygon points="{x:.1f},{y - 7:.1f} {x + 6:.1f},{y + 5:.1f} {x - 6:.1f},{y + 5:.1f}"/>'
    if k == "tool":
        return f'<rect x="{x - 1.5:.1f}" y="{y + 6:.1f}" width="3" height="8"/>'
    if k == "model":
        return f'<rect x="{x - 1.5:.1f}" y="{y - 14:.1f}" width="3" height="8"/>'
    if k in ("error", "failed"):
        s = 5 if k == "error" else 8
        a, b, c, e = x - s, x + s, y - s, y + s
        return f'<path d="M{a:.1f},{c:.1f} L{b:.1f},{e:.1f} M{a:.1f},{e:.1f} L{b:.1f},{c:.1f}"/>'
    return f'<rect x="{x - 6:.1f}" y="{y - 6:.1f}" width="12" height="12" rx="2"/>'


def timeline_svg(d: RunDetail) -> str:
    lanes = list(d.agents)
    for m in d.marks:
        if m.agent not in lanes:
            lanes.append(m.agent)
    if not lanes:
        return "<p class='empty'>Nothing happened yet.</p>"
    span = max(d.duration_s, max((m.t for m in d.marks), default=0.0), 1.0)
    plot_w = W - LABEL_W - PAD_R
    h = 30 + LANE_H * len(lanes) + 26
    colors = _colors(lanes)

    def x_of(t: float) -> float:
        return LABEL_W + plot_w * min(1.0, max(0.0, t / span))

    parts = [f'<svg class="chart timeline" viewBox="0 0 {W} {h}" role="img" aria-label="timeline">']
    for i, a in enumerate(lanes):
        top = 30 + LANE_H * i
        parts.append(
            f'<rect class="lane{i % 2}" x="{LABEL_W}" y="{top}" width="{plot_w}" height="{LANE_H}"/>'
            f'<text class="lbl c{colors[a]}" x="{LABEL_W - 8}" y="{top + LANE_H / 2 + 4:.0f}" text-anchor="end">'
            f"{esc(a[:18])}</text>"
        )
    axis_y = 30 + LANE_H * len(lanes)
    for t in _ticks(span):
        x = x_of(t)
        parts.append(
            f'<line class="grid" x1="{x:.1f}" y1="24" x2="{x:.1f}" y2="{axis_y}"/>'
            f'<text class="tick" x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">{esc(fmt_dur(t))}</text>'
        )
    for m in d.marks:
        lane = lanes.index(m.agent)
        y = 30 + LANE_H * lane + LANE_H / 2
        x = x_of(m.t)
        seq = "" if m.seq is None else f' data-seq="{m.seq}"'
        parts.append(
            f'<g class="mark m-{esc(m.kind)} c{colors[m.agent]}" data-t="{m.t:.3f}"{seq}>'
            f"<title>{esc(fmt_dur(m.t))} {esc(m.agent)} {esc(m.kind)}: {esc(m.title)}</title>"
            f"{_mark_shape(m, x, y)}</g>"
        )
    counts = {k: sum(1 for m in d.marks if m.kind == k) for k in MARK_KINDS}
    legend_x = LABEL_W
    for k in MARK_KINDS:
        if not counts[k]:
            continue
        parts.append(
            f'<g class="legend m-{k}">{_mark_shape(Mark(0, "", k, ""), legend_x + 8, 12)}'
            f'<text x="{legend_x + 20}" y="16">{k} ({counts[k]})</text></g>'
        )
        legend_x += 30 + 9 * (len(k) + len(str(counts[k])) + 3)
    parts.append("</svg>")
    return "".join(parts)


def _polyline(pts: list[UsagePoint], x_of: Any, y_of: Any, value: Any) -> str:
    # A step line: usage jumps when a call is recorded and stays flat in between.
    coords, prev_y = [], None
    for p in pts:
        x, y = x_of(p.t), y_of(value(p))
        if prev_y is not None:
            coords.append(f"{x:.1f},{prev_y:.1f}")
        coords.append(f"{x:.1f},{y:.1f}")
        prev_y = y
    return " ".join(coords)


def usage_svg(d: RunDetail, what: str) -> str:
    """Cumulative cost or tokens over time: the total, then per agent and per model."""

    def value(p: UsagePoint) -> float:
        return p.cost_usd if what == "cost" else float(p.tokens)

    total = d.usage_total
    last = total[-1]
    top = max(value(last), 1e-9)
    span = max(d.duration_s, max((p.t for p in total), default=0.0), 1.0)
    h, left, bottom = 220, 80, 28
    plot_w, plot_h = W - left - PAD_R, h - 20 - bottom

    def x_of(t: float) -> float:
        return left + plot_w * min(1.0, max(0.0, t / span))

    def y_of(v: float) -> float:
        return 12 + plot_h * (1 - min(1.0, v / top))

    parts = [f'<svg class="chart usage" viewBox="0 0 {W} {h}" role="img" aria-label="{what} over time">']
    for i in range(5 if value(last) > 0 else 1):
        v = top * i / 4
        y = y_of(v)
        label = fmt_cost(v) if what == "cost" else f"{int(v):,}"
        parts.append(
            f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{W - PAD_R}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(label)}</text>'
        )
    for t in _ticks(span):
        parts.append(f'<text class="tick" x="{x_of(t):.1f}" y="{h - 8}" text-anchor="middle">{esc(fmt_dur(t))}</text>')
    series: list[tuple[str, str, list[UsagePoint]]] = []
    agent_colors = _colors(d.agents or d.usage_by_agent)
    for name, pts in d.usage_by_agent.items():
        series.append((f"agent {name}", f"s-agent c{agent_colors.get(name, 0)}", pts))
    for i, (name, pts) in enumerate(d.usage_by_model.items()):
        series.append((f"model {name}", f"s-model c{(i + 3) % PALETTE}", pts))
    for label, cls, pts in series:
        parts.append(
            f'<polyline class="{cls}" points="{_polyline(pts, x_of, y_of, value)}">'
            f"<title>{esc(label)}</title></polyline>"
        )
    last_attr = f'data-last-cost="{last.cost_usd!r}"' if what == "cost" else f'data-last-tokens="{last.tokens}"'
    last_label = fmt_cost(last.cost_usd) if what == "cost" else f"{last.tokens:,} tokens"
    parts.append(
        f'<polyline class="s-total" points="{_polyline(total, x_of, y_of, value)}"><title>total</title></polyline>'
        f'<circle class="s-total-end" {last_attr} cx="{x_of(last.t):.1f}" cy="{y_of(value(last)):.1f}" r="4">'
        f"<title>total {esc(last_label)}</title></circle>"
    )
    parts.append("</svg>")
    return "".join(parts)


def _usage(d: RunDetail) -> str:
    last = d.usage_total[-1]
    calls = len(d.usage_total) - 1
    if not calls:
        return "<h2>Tokens and cost</h2><p class='empty'>No model calls (scripted agents, or none yet).</p>"
    legend = ['<span class="key"><span class="sw s-total"></span>total</span>']
    colors = _colors(d.agents or d.usage_by_agent)
    legend += [
        f'<span class="key"><span class="sw c{colors.get(a, 0)}"></span>agent {esc(a)}</span>' for a in d.usage_by_agent
    ]
    legend += [
        f'<span class="key"><span class="sw dash c{(i + 3) % PALETTE}"></span>model {esc(m)}</span>'
        for i, m in enumerate(d.usage_by_model)
    ]
    rows = "".join(
        f"<tr><td>{esc(m)}</td><td>{len(p) - 1}</td><td>{p[-1].tokens:,}</td>"
        f"<td>{esc(fmt_cost(p[-1].cost_usd))}</td></tr>"
        for m, p in d.usage_by_model.items()
    )
    return (
        f'<h2>Tokens and cost</h2><p class="usage-total" id="usage-total" data-cost="{last.cost_usd!r}"'
        f' data-tokens="{last.tokens}" data-calls="{calls}">{calls} model calls · <b>{last.tokens:,}</b> tokens · '
        f"<b>{esc(fmt_cost(last.cost_usd))}</b></p>"
        f'<div class="legend-row">{"".join(legend)}</div>'
        f"<h3>Cost over time</h3>{usage_svg(d, 'cost')}<h3>Tokens over time</h3>{usage_svg(d, 'tokens')}"
        "<table class='grid'><thead><tr><th>model</th><th>calls</th><th>tokens</th><th>cost</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def _answers(d: RunDetail) -> str:
    out = ["<h2>Answers</h2>"]
    if d.final is not None:
        out.append(
            f'<article class="answer final" id="final-answer"><header>Final answer · {esc(d.final.agent)}</header>'
            f'<div class="md">{render_markdown(d.final.content)}</div></article>'
        )
    if not d.answers:
        out.append("<p class='empty'>No answers yet.</p>")
    colors = _colors(d.agents)
    shown = d.answers[-MAX_ANSWERS_SHOWN:]
    for a in reversed(shown):
        out.append(
            f'<article class="answer" data-label="{esc(a.label)}"><header><span class="sw c{colors.get(a.agent, 0)}">'
            f"</span>{esc(a.label)} · {esc(a.agent)} · at {esc(fmt_dur(a.t))}</header>"
            f'<div class="md">{render_markdown(a.content)}</div></article>'
        )
    older = len(d.answers) - len(shown)
    if older:
        out.append(
            f"<p class='empty'>{older} older answers not shown here; every answer is in the log dir"
            " under agents/&lt;agent&gt;/&lt;label&gt;/answer.txt.</p>"
        )
    return "".join(out)


def _children(d: RunDetail, live_page: bool) -> str:
    if not d.children:
        return "<h2>Nested runs</h2><p class='empty'>None.</p>"
    rows = []
    for c in d.children:
        link = f'<a href="/run/{esc(c.run_id)}">{esc(c.run_id)}</a>' if live_page else esc(c.run_id)
        rows.append(
            f"<tr><td>{link}</td><td>{state_badge(c)}</td><td>{esc(c.phase or '')}</td>"
            f"<td>{esc('' if c.exit_code is None else c.exit_code)}</td><td>{esc(c.reason or '')}</td>"
            f"<td>{esc(c.winner or '')}</td><td>{esc(fmt_dur(c.elapsed_s))}</td></tr>"
        )
    return (
        "<h2>Nested runs</h2><table class='grid'><thead><tr><th>run</th><th>state</th><th>phase</th><th>exit</th>"
        f"<th>reason</th><th>winner</th><th>elapsed</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _container(d: RunDetail) -> str:
    c = d.container
    if not c:
        return "<h2>Container</h2><p class='empty'>No container (yet, or --sandbox none).</p>"
    cpu = c.get("cpu_percent")
    facts = "".join(
        (
            _fact("id", esc(str(c.get("id") or "")[:12])),
            _fact("image", esc(c.get("image") or "")),
            _fact("runtime", esc(c.get("runtime") or "")),
            _fact("state", esc(c.get("state") or "")),
            _fact("exit code", esc("" if c.get("exit_code") is None else c.get("exit_code"))),
            _fact("OOM killed", "yes" if c.get("oom_killed") else ""),
            _fact("cpu", esc(f"{cpu:.1f}%" if isinstance(cpu, int | float) else "")),
            _fact("memory", esc(fmt_bytes(c.get("memory_bytes") if isinstance(c.get("memory_bytes"), int) else None))),
            _fact("pids", esc(c.get("pids") if c.get("pids") is not None else "")),
        )
    )
    return f'<h2>Container</h2><dl class="facts">{facts}</dl>'


def _result(d: RunDetail) -> str:
    if d.result is None:
        return "<h2>result.json</h2><p class='empty'>Not written yet (the run is not over).</p>"
    return f'<h2>result.json</h2><pre class="json">{esc(json.dumps(d.result, indent=2))}</pre>'


def run_sections(d: RunDetail, *, can_stop: bool = False, live_page: bool = True) -> dict[str, str]:
    """Each section's inner HTML, keyed by name (the live page swaps them one by one)."""
    return {
        "head": _head(d, can_stop, live_page),
        "agents": _agents(d),
        "timeline": "<h2>Timeline</h2>" + timeline_svg(d),
        "usage": _usage(d),
        "answers": _answers(d),
        "children": _children(d, live_page),
        "container": _container(d),
        "result": _result(d),
    }


def run_page_body(d: RunDetail, *, can_stop: bool = False, live_page: bool = True) -> str:
    secs = run_sections(d, can_stop=can_stop, live_page=live_page)
    crumb = f" / <span>{esc(d.row.run_id)}</span>"
    html_secs = "\n".join(f'<section id="sec-{k}" class="card">{v}</section>' for k, v in secs.items())
    size = f"last {len(d.log_tail.encode()) // 1024 + 1} KiB"
    log_note = f"{size}, follows the file" if live_page else size
    log = (
        f'<section id="sec-log" class="card"><h2>massgen.log <small>({esc(log_note)})</small></h2>'
        f'<pre id="log" class="log" data-offset="{d.log_offset}">{esc(d.log_tail)}</pre></section>'
    )
    return (
        f'{topbar(crumb, live=live_page)}\n<main class="run" id="run" data-run="{esc(d.row.run_id)}">'
        f"\n{html_secs}\n{log}\n</main>"
    )
