"""What a reader sees first: which measure leads, the state of the stores, and a few sentences
computed from an analysis summary (:func:`analyses.report.analyze`).

- :func:`headline_measure`: the measure a store is summed up by, the one whose class-pair grid
  ``analyze`` draws by default (the others on request);
- :func:`status_lines`: the stores replayed only in part, and those skipped;
- :func:`headline`: does a same-class pair move more than a cross-class pair, how the separation
  moves over training, where the phases of a regression break, and which configuration
  separates most.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from analyses.tables import fmt

# In order of preference: the true KL divergence, the L2 change of probabilities the paper's text
# defines (classification); the L2 change of outputs (regression).
HEADLINE_MEASURES = ("kl", "orig_probs_l2", "orig_outputs_l2")
AUC_CHANGE = 0.02  # an AUC that moves less than this over training "stays"


def headline_measure(stored: Sequence[str]) -> str:
    """The first measure of :data:`HEADLINE_MEASURES` among ``stored`` (not empty); the first
    stored one when there is none of them."""
    return next((m for m in HEADLINE_MEASURES if m in stored), stored[0])


def status_lines(summary: dict[str, Any]) -> list[str]:
    """One line per store replayed only in part (fewer snapshots done than the run lists), and
    one line naming the stores skipped and why."""
    lines = []
    for store, s in summary["stores"].items():
        n = s["snapshots"]
        if n["partial"]:
            early = n["last_step"] < n["last_listed_step"]
            final = f"; its final values are those of step {n['last_step']:,}" if early else ""
            lines.append(
                f"Partial: {store} has {n['done']} of {n['listed']} snapshots replayed (steps "
                f"{n['first_step']:,} to {n['last_step']:,} of {n['last_listed_step']:,}){final}; "
                "rerun its replay to do the rest."
            )
    if summary["skipped"]:
        skipped = "; ".join(f"{store} ({why})" for store, why in summary["skipped"].items())
        lines.append(f"Skipped: {skipped}.")
    return lines


def headline(summary: dict[str, Any]) -> list[str]:
    """A few sentences on the results, for a headline measure of every store."""
    sentences = []
    aucs = {}
    for store, s in summary["stores"].items():
        if not s["measures"]:
            continue
        lead = headline_measure(list(s["measures"]))
        m = s["measures"][lead]
        if "separation_auc" in m:
            sentences += _separation(store, lead, m, s["snapshots"])
            if m["separation_auc"]["time_average"] is not None:
                aucs[store] = (lead, m["separation_auc"]["time_average"])
        elif "phases" in m:
            sentences.append(_phases(store, lead, m["phases"]["mean"]))
    by_measure = {measure for measure, _ in aucs.values()}
    if len(aucs) > 1 and len(by_measure) == 1:
        ranked = sorted(aucs.items(), key=lambda item: -item[1][1])
        (best, (measure, high)), (worst, (_, low)) = ranked[0], ranked[-1]
        sentences.append(
            f"Of the {len(aucs)} configurations, {best} separates the classes most ({measure}: "
            f"time-averaged AUC {fmt(high)}) and {worst} least ({fmt(low)})."
        )
    return sentences


def _separation(store: str, measure: str, m: dict[str, Any], snapshots: dict[str, Any]) -> list[str]:
    """Whether same-class pairs move more than cross-class pairs, and how the AUC moves."""
    auc = m["separation_auc"]
    average, (low, high) = auc["time_average"], auc["ci"]["time_average"]
    if average is None or low is None or high is None:
        return [f"{store}, {measure}: the separation AUC is undefined (no same- and cross-class pairs)."]
    ratio = m["same_cross_ratio_class_mean"]["mean"]
    interval = f"{auc['ci']['level']:.0%} interval {fmt(low)} to {fmt(high)}"
    if low > 0.5:
        verdict = "an update on one example moves examples of its own class more than others"
    elif high < 0.5:
        verdict = "an update on one example moves examples of other classes more than its own"
    else:
        verdict = "same-class and cross-class pairs are not told apart"
    lines = [
        f"{store}, {measure}: {verdict}: separation AUC {fmt(average)} averaged over training "
        f"({interval}; 0.5 means no separation), same-class S_rel {fmt(ratio)} times the cross-class mean."
    ]
    first, final = auc.get("first"), auc["final"]
    if snapshots["done"] > 1 and first is not None and final is not None:
        trend = "rises" if final > first + AUC_CHANGE else "falls" if final < first - AUC_CHANGE else "stays"
        lines.append(
            f"Over training its AUC {trend} from {fmt(first)} at step {snapshots['first_step']:,} "
            f"to {fmt(final)} at step {snapshots['last_step']:,}."
        )
    return lines


def _phases(store: str, measure: str, p: dict[str, Any]) -> str:
    """Where the median S_rel trajectory breaks, and whether it settles."""
    if not p["found"]:
        return f"{store}, {measure}: no phase transition in the median S_rel ({p['reason']})."
    before, after = (fmt(r) for r in p["rates"])
    kind = (
        "an elastic-to-inelastic transition"
        if p["settles"]
        else "the change speeds up after the break (not an elastic-to-inelastic transition)"
    )
    return (
        f"{store}, {measure}: the median S_rel changes by {before} per step until step {p['step']:,}, "
        f"then by {after} per step: {kind}."
    )
