"""Render an analysis summary (:func:`analyses.report.analyze`) as one self-contained HTML page.

The page opens with the state of the stores (replayed in part, skipped) and the headline
sentences (:mod:`analyses.headline`), then a table of contents, the key figures (the measures
compared, the stores compared, a regression's phases), the summary tables and, for stores
replayed with ``--module-split``, where elasticity lives (:mod:`analyses.modules`); the class-pair
grids, the per-class tables, the training and the configurations follow folded
(``<details>``). The figures are embedded as base64 PNG data; the page needs no other file.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from analyses.modules import describe
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
.status { background: #fff4e0; border-left: 4px solid #e69500; padding: 0.3em 1em; }
.headline li { margin: 0.3em 0; }
nav { background: #f7f7f7; padding: 0.3em 1em; display: inline-block; }
details { margin: 1em 0; } summary { cursor: pointer; font-weight: bold; font-size: 1.1em; }
"""


@dataclass
class Section:
    """One section of the page: its anchor, its title, its HTML, and whether it starts folded."""

    anchor: str
    title: str
    body: str
    folded: bool = False

    def html(self) -> str:
        if self.folded:
            return f'<details id="{self.anchor}"><summary>{escape(self.title)}</summary>\n{self.body}\n</details>'
        return f'<h2 id="{self.anchor}">{escape(self.title)}</h2>\n{self.body}'


def render_report(summary: dict[str, Any], out_dir: Path) -> str:
    """The HTML page of ``summary``: the status and headline, the figures (PNG files read from
    ``out_dir``), the tables and each store's configuration (and the group's)."""
    name = escape(Path(summary["run_dir"]).name)
    sections = [s for s in _sections(summary, out_dir) if s.body]
    contents = "".join(f'<li><a href="#{s.anchor}">{escape(s.title)}</a></li>' for s in sections)
    status = summary.get("status", []) + [f"Note: {note}" for note in summary.get("notes", [])]
    parts = [f"<h1>Local elasticity: {name}</h1>", f"<p>{_what(summary)}</p>"]
    if status:
        parts.append('<div class="status">' + "".join(f"<p>{escape(line)}</p>" for line in status) + "</div>")
    if summary.get("headline"):
        items = "".join(f"<li>{escape(sentence)}</li>" for sentence in summary["headline"])
        parts.append(f'<ul class="headline">{items}</ul>')
    parts.append(f"<nav><b>Contents</b><ol>{contents}</ol></nav>")
    parts += [s.html() for s in sections]
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Local elasticity: {name}</title>"
        f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n"
    )


def _what(summary: dict[str, Any]) -> str:
    """The sentence that says what was analyzed."""
    selfs = "included (the paper's protocol)" if summary["include_self"] else "excluded"
    where = f"<code>{escape(summary['run_dir'])}</code>"
    what = (
        f"Run group {where} of {len(summary['runs'])} runs ({escape(', '.join(summary['runs']))}): numbers "
        "and curves are means over the runs, bands one standard deviation"
        if summary["group"] is not None
        else f"Run directory {where}"
    )
    preset = f"; preset {escape(summary['preset'])}" if summary["preset"] else ""
    return f"{what}; task {escape(summary['task'])}{preset}; self pairs {selfs} in the same-class cells."


def _sections(summary: dict[str, Any], out_dir: Path) -> list[Section]:
    """Every section, in page order (empty ones are left out by the caller)."""
    figures = {
        section: [f for f in summary["figures"] if f.get("section", "key") == section]
        for section in ("key", "classpairs", "modules", "training")
    }
    sections = [
        Section("key-figures", "Key figures", _figures(figures["key"], out_dir)),
        Section("summary", "Summary", _table(SUMMARY_HEADER, summary_rows(summary)) + _note(SUMMARY_NOTE)),
    ]
    if summary["paper"]:
        table = _table(paper_header(summary["paper"]), paper_rows(summary["paper"]))
        sections.append(
            Section("paper", f"The paper's table: {summary['paper']['data']}", table + _note(PAPER_NOTE))
        )
    phases = phase_rows(summary)
    if phases:
        table = _table(PHASES_HEADER, phases) + _note(PHASES_NOTE)
        sections.append(Section("phases", "Elastic-to-inelastic transition", table))
    sections.append(
        Section("modules", "Where elasticity lives", _modules(summary, figures["modules"], out_dir))
    )
    count = len(figures["classpairs"])
    sections.append(
        Section(
            "classpairs",
            f"Class-pair curves ({count} figure{'s' * (count != 1)})",
            _figures(figures["classpairs"], out_dir),
            folded=True,
        )
    )
    ratios = [
        f"<h3>{escape(store_name)}</h3>" + _table(*ratio_table(store))
        for store_name, store in summary["stores"].items()
        if store["classification"]
    ]
    sections.append(Section("ratios", "Same/cross ratio per class", "\n".join(ratios), folded=True))
    if summary["comparison"]:
        table = _table(COMPARISON_HEADER, comparison_rows(summary))
        sections.append(Section("comparison", "Configurations compared: every measure", table, folded=True))
    training = [
        [metric, kind, fmt(t["final"]), str(t["step"])]
        for kind, by_name in summary["training"].items()
        for metric, t in by_name.items()
    ]
    body = (
        _table(("metric", "logged per", "final value", "at step"), training) if training else ""
    ) + _figures(figures["training"], out_dir)
    sections.append(Section("training", "Training", body, folded=True))
    sections.append(Section("configuration", "Configuration", _configuration(summary), folded=True))
    return sections


MODULES_HEADER = ("module", "same-class share", "cross-class share", "same-class part", "cross-class part")
MODULES_NOTE = (
    "Each module's share of the first-order change J_j U_i of a probe j when the network is updated "
    "on a probe i, projected on the whole change and in units of i's own change; the shares of the "
    "modules add up to the linear measure. Same-class: the mean over the pairs of one class, "
    "cross-class: over the pairs of two classes. The part of a module is its share over the total "
    "(negative: the module's change points against the whole change)."
)


def _modules(summary: dict[str, Any], figures: list[dict[str, str]], out_dir: Path) -> str:
    """Per store with module shares: a sentence, the final snapshot's table; then the figures."""
    parts = []
    for store_name, store in summary["stores"].items():
        if "modules" not in store:
            continue
        m = store["modules"]
        columns = ("same_class", "cross_class", "same_class_fraction", "cross_class_fraction")
        rows = [[name, *(fmt(m[c][k]) for c in columns)] for k, name in enumerate(m["modules"])]
        total = [m["total"][c] for c in columns[:2]]
        rows.append(
            ["all modules (= linear)", *map(fmt, total), *(fmt(None if t is None else 1.0) for t in total)]
        )
        parts.append(
            f"<h3>{escape(store_name)}, step {m['step']}</h3><p>{escape(describe(m))}</p>"
            + _table(MODULES_HEADER, rows)
        )
    if not parts:
        return ""
    return "\n".join(parts) + _note(MODULES_NOTE) + _figures(figures, out_dir)


def _configuration(summary: dict[str, Any]) -> str:
    """Each store's snapshots and configuration, the group's configuration, the stores skipped."""
    parts = []
    for store_name, store in summary["stores"].items():
        snaps = store["snapshots"]
        parts.append(
            f"<h3>{escape(store_name)}</h3><p>{snaps['done']} of {snaps['listed']} snapshots done "
            f"(steps {snaps['first_step']} to {snaps['last_step']}); dtype {escape(store['dtype'])}; "
            f"largest error estimate {fmt(store['error_estimate_max'])}.</p>"
            f"<pre>{escape(json.dumps(store['config'], indent=2, sort_keys=True))}</pre>"
        )
    if summary["group"] is not None:
        parts += [
            "<h3>Run group</h3>",
            f"<pre>{escape(json.dumps(summary['group'], indent=2, sort_keys=True))}</pre>",
        ]
    for store_name, reason in summary["skipped"].items():
        parts.append(f"<p>Store {escape(store_name)} skipped: {escape(reason)}.</p>")
    return "\n".join(parts)


def _figures(figures: list[dict[str, str]], out_dir: Path) -> str:
    """The ``figures`` (files in ``out_dir``) embedded, with their captions."""
    parts = []
    for fig in figures:
        data = base64.b64encode((out_dir / fig["file"]).read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img alt="{escape(fig["file"])}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(fig['caption'])} ({escape(fig['file'])})</figcaption></figure>"
        )
    return "\n".join(parts)


def _note(text: str) -> str:
    return f"<p>{escape(text)}</p>"


def _table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
