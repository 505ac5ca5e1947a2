"""The tables of an analysis summary (:func:`analyses.report.analyze`), as rows of strings.

Shared by the printed table (:func:`analyses.report.format_table`) and the HTML report.
"""

from __future__ import annotations

from typing import Any

from analyses.published import PUBLISHED_AS

NUMBER_COLUMNS = ("AUC final", "AUC avg", "AUC avg CI", "same/cross", "same/cross (median)", "median S final")
SUMMARY_HEADER = ("store", "measure", *NUMBER_COLUMNS)
COMPARISON_HEADER = ("measure", "store", *NUMBER_COLUMNS)
SUMMARY_NOTE = (
    "AUC: separation AUC, P(same-class S > cross-class S), 0.5 = none, final and time-averaged, "
    "with a 95% bootstrap interval over probes; "
    "same/cross: time-averaged A[b,b] / mean A[a!=b,b] from mean (median) class-pair aggregates, "
    "mean over classes b; median S: median over pairs i != j at the last step."
)


def summary_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per store and measure, columns :data:`SUMMARY_HEADER`; a store replayed only in
    part is marked with its snapshots done, e.g. ``adam-fresh (25/201 snapshots)``."""
    return [
        [store_label(store, s), measure, *_numbers(m)]
        for store, s in summary["stores"].items()
        for measure, m in s["measures"].items()
    ]


def store_label(store: str, s: dict[str, Any]) -> str:
    """``store``, with ``(done/listed snapshots)`` when it is replayed only in part."""
    n = s["snapshots"]
    return f"{store} ({n['done']}/{n['listed']} snapshots)" if n["partial"] else store


def comparison_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per measure stored in several stores and per store, columns :data:`COMPARISON_HEADER`."""
    return [
        [measure, store, *_numbers(m)]
        for measure, per_store in summary["comparison"]["measures"].items()
        for store, m in per_store.items()
    ]


def ratio_table(store: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The SPEC §5 table of one classification store: header and rows (measure, aggregate, then
    the time-averaged same/cross ratio of each updated class)."""
    header = ["measure", "aggregate", *(f"class {c}" for c in store["classes"])]
    rows = [
        [measure, stat, *(fmt(v) for v in values)]
        for measure, m in store["measures"].items()
        for stat, values in m["same_cross_ratio"].items()
    ]
    return header, rows


PAPER_NOTE = (
    "Time-averaged A[b,b] / mean A[a!=b,b] per updated class b, self pairs included (the paper's "
    "protocol), mean ± sd over runs, beside the published mean of 3 runs. The published orig column "
    "stands beside seed_orig, the ratio the paper's code computed (mean absolute probability change "
    "over the root mean square of the self change), not beside orig_probs_l2; the published KL column "
    "beside seed_kl. The published accuracy was measured on training images."
)
ACCURACY_LABELS = {  # metric of ours -> how the table names the comparison
    "test_acc": ("test accuracy", "ours on test images, published on training images"),
    "train_sample_acc": ("training-image accuracy", "both on a sample of training images"),
}
PHASES_HEADER = (
    "store",
    "measure",
    "trajectory",
    "transition at step",
    "rate before",
    "rate after",
    "explained",
)
PHASES_NOTE = (
    "Median S_rel over pairs fit by one line or two (the break of least squared error); a transition "
    "where two lines win by BIC and explain at least half of the one-line error. Rates: S_rel per step."
)


def paper_header(paper: dict[str, Any]) -> list[str]:
    """Columns of the SPEC §5 table: store, measure, source, then one per sampled class."""
    names = paper["class_names"] or [str(c) for c in paper["classes"]]
    return [
        "store",
        "measure",
        "source",
        *(f"class {c} ({n})" for c, n in zip(paper["classes"], names, strict=True)),
    ]


def paper_rows(paper: dict[str, Any]) -> list[list[str]]:
    """The SPEC §5 table: per store and measure, our ratios (mean ± sd) and the published ones;
    a last row with the final accuracy beside the published one, saying which accuracy ours is."""
    rows = []
    for store, measures in paper["stores"].items():
        for measure, r in measures.items():
            rows.append(
                [store, measure, "ours", *(_pm(m, s) for m, s in zip(r["ours"], r["std"], strict=True))]
            )
            if r["published"] is not None:
                source = f"published {PUBLISHED_AS.get(measure, measure)}"
                rows.append([store, measure, source, *(fmt(v) for v in r["published"])])
    acc = paper["test_acc"]
    label, on = ACCURACY_LABELS[acc.get("metric", "test_acc")]
    cells = ["", label, f"ours {_pm(acc['ours'], acc['std'])}, published {fmt(acc['published'])} ({on})"]
    return rows + [cells + [""] * (len(paper["classes"]) + 3 - len(cells))]


def phase_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per regression store, measure and trajectory (the run mean, then each run),
    columns :data:`PHASES_HEADER`."""
    rows = []
    for store, s in summary["stores"].items():
        for measure, m in s["measures"].items():
            if "phases" not in m:
                continue
            mean = "mean over runs" if m["phases"]["runs"] else "run"
            for name, p in [(mean, m["phases"]["mean"]), *m["phases"]["runs"].items()]:
                if p["found"]:
                    rows.append(
                        [
                            store,
                            measure,
                            name,
                            str(p["step"]),
                            *(fmt(r) for r in p["rates"]),
                            fmt(p["explained"]),
                        ]
                    )
                else:
                    rows.append([store, measure, name, f"none: {p['reason']}", "", "", fmt(p["explained"])])
    return rows


def fmt(x: float | None) -> str:
    """Three significant digits; ``-`` for a missing (or non-finite) number."""
    return "-" if x is None else f"{x:.3g}"


def _pm(mean: float | None, std: float | None) -> str:
    """``mean ± std``, or the mean alone without a (finite) spread."""
    return fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"


def _numbers(m: dict[str, Any]) -> list[str]:
    """The :data:`NUMBER_COLUMNS` of one measure's summary (``-`` where a regression has none)."""
    auc = m.get("separation_auc") or {}
    ratio = m.get("same_cross_ratio_class_mean") or {}
    ci = auc["ci"]["time_average"] if auc else None
    return [
        fmt(auc.get("final")),
        fmt(auc.get("time_average")),
        "-" if ci is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]",
        fmt(ratio.get("mean")),
        fmt(ratio.get("median")),
        fmt(m["median_S"]["final"]),
    ]
