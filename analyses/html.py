"""Render an analysis summary (:func:`analyses.report.analyze`) as one self-contained HTML page.

The figures are embedded as base64 PNG data; the page needs no other file.
"""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path
from typing import Any

from analyses.tables import (
    COMPARISON_HEADER,
    PAPER_NOTE,
    PHASES_HEADER,
    PHASES_NOTE,
    SUMMARY_HEADER,
    SUMMARY_NOTE,
    comparison_rows,
    fmt,
    paper_header,
    paper_rows,
    phase_rows,
    ratio_table,
    summary_rows,
)

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, td:nth-child(2) { text-align: left; }
figure { margin: 1.5em 0; } figcaption { font-size: 0.9em; color: #555; }
img { max-width: 100%; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
"""


def render_report(summary: dict[str, Any], out_dir: Path) -> str:
    """The HTML page of ``summary``: the tables, the figures (PNG files read from ``out_dir``)
    and each store's configuration (and the group's)."""
    name = escape(Path(summary["run_dir"]).name)
    selfs = "included (the paper's protocol)" if summary["include_self"] else "excluded"
    group = summary["group"] is not None
    where = f"<code>{escape(summary['run_dir'])}</code>"
    what = (
        f"Run group {where} of {len(summary['runs'])} runs ({escape(', '.join(summary['runs']))}): numbers "
        "and curves are means over the runs, bands one standard deviation"
        if group
        else f"Run directory {where}"
    )
    preset = f"; preset {escape(summary['preset'])}" if summary["preset"] else ""
    parts = [
        f"<h1>Local elasticity: {name}</h1>",
        f"<p>{what}; task {escape(summary['task'])}{preset}; self pairs {selfs} in the same-class cells.</p>",
        "<h2>Summary</h2>",
        _table(SUMMARY_HEADER, summary_rows(summary)),
        f"<p>{escape(SUMMARY_NOTE)}</p>",
    ]
    if summary["paper"]:
        parts += [
            f"<h2>The paper's table (SPEC &sect;5): {escape(summary['paper']['data'])}</h2>",
            _table(paper_header(summary["paper"]), paper_rows(summary["paper"])),
            f"<p>{escape(PAPER_NOTE)}</p>",
        ]
    phases = phase_rows(summary)
    if phases:
        parts += [
            "<h2>Elastic-to-inelastic transition</h2>",
            _table(PHASES_HEADER, phases),
            f"<p>{escape(PHASES_NOTE)}</p>",
        ]
    for store_name, store in summary["stores"].items():
        if store["classification"]:
            parts += [
                f"<h2>Same/cross ratio per class: {escape(store_name)} (SPEC &sect;5)</h2>",
                _table(*ratio_table(store)),
            ]
    if summary["comparison"]:
        parts += ["<h2>Configurations compared</h2>", _table(COMPARISON_HEADER, comparison_rows(summary))]
    training = [
        [metric, kind, fmt(t["final"]), str(t["step"])]
        for kind, by_name in summary["training"].items()
        for metric, t in by_name.items()
    ]
    if training:
        parts += ["<h2>Training</h2>", _table(("metric", "logged per", "final value", "at step"), training)]
    parts.append("<h2>Figures</h2>")
    for fig in summary["figures"]:
        data = base64.b64encode((out_dir / fig["file"]).read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img alt="{escape(fig["file"])}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(fig['caption'])} ({escape(fig['file'])})</figcaption></figure>"
        )
    parts.append("<h2>Configuration</h2>")
    for store_name, store in summary["stores"].items():
        snaps = store["snapshots"]
        parts.append(
            f"<h3>{escape(store_name)}</h3><p>{snaps['done']} of {snaps['stored']} snapshots done "
            f"(steps {snaps['first_step']} to {snaps['last_step']}); dtype {escape(store['dtype'])}; "
            f"largest error estimate {fmt(store['error_estimate_max'])}.</p>"
            f"<pre>{escape(json.dumps(store['config'], indent=2, sort_keys=True))}</pre>"
        )
    if group:
        parts += [
            "<h3>Run group</h3>",
            f"<pre>{escape(json.dumps(summary['group'], indent=2, sort_keys=True))}</pre>",
        ]
    for store_name, reason in summary["skipped"].items():
        parts.append(f"<p>Store {escape(store_name)} skipped: {escape(reason)}.</p>")
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Local elasticity: {name}</title>"
        f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n"
    )


def _table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
