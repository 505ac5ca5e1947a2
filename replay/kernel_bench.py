"""The first-order path at scale: one snapshot of the digits MLP with every one of the 1,797
images as probes.

On the snapshot of :func:`replay.bench.make_case` (the ``digits`` preset's MLP, 64 -> 128 -> 10,
after 100 Adam steps) and ``P`` probes (the first ``P`` of the training split followed by the
test split, as :func:`recorder.datasets.digits` standardizes them), it times in one process:

- **gram**: :class:`~replay.firstorder.TangentKernel` in form ``auto`` (per-layer Gram products),
  then ``ntk`` ``[P, P]`` and the first-order change ``linear[i, j] = J_j . U_i`` ``[P, P, C]``
  under ``sgd`` (``U_i = -lr g_i``), rows in blocks within the memory budget;
- **jacobian**: the same from per-sample Jacobians ``[P, C, n]`` materialised by
  ``torch.func.jacrev`` under ``vmap`` (form ``jacobian``), every row at once without a budget
  check (its peak memory shows where it exceeds the budget); its arrays against gram's;
- **engine**: :meth:`~replay.engine.Engine.replay_snapshot` of the snapshot computing the exact
  ``orig_logits_l2``, ``linear`` and ``ntk`` (precision ``auto``); its ``ntk`` and ``linear``
  against gram's;
- **loop**: the plain loop (:func:`replay.reference.stepped_copies`: per updated probe a deep copy
  of the model in float64, one real ``torch.optim.SGD`` step on that probe, all ``P`` probes
  evaluated) on ``loop_rows`` updated probes spread evenly over the probe set; every row costs the
  same (one step, one forward pass of all ``P`` probes), so its time is scaled by
  ``P / loop_rows`` to the whole snapshot. Its ``orig_logits_l2`` rows against the engine's.

Each path is called once, timed, with its peak memory above the start measured
(:class:`replay.bench.PeakMemory`: on a CPU the resident set, sampled every millisecond); with
``repeats``, that call counts as a warm-up and the time is the median of ``repeats`` more calls.
The engine is built outside its timing (a replay builds it once for all snapshots). Differences
are relative, ``max |a - b| / max |b|``: gram against the materialised Jacobians and the engine
must agree to 1e-10, the engine's ``orig`` with the loop's to 1e-3 (the engine's precision bar);
the command exits with status 1 where one does not.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from recorder.datasets import digits
from recorder.models import build_model, forward
from recorder.rundir.errors import ElasticityError, ReplayError
from replay.bench import PRECISION_BAR, Case, PeakMemory, make_case
from replay.config import ReplayConfig, UpdateConfig
from replay.engine import Engine
from replay.firstorder import TangentKernel, output_gradients
from replay.measures import evaluate, resolve_measures
from replay.reference import stepped_copies
from replay.updates import RULES, gradient_scale

AGREEMENT_BAR = 1e-10  # relative, float64: gram against the materialised Jacobians and the engine
DIGITS_LR = 1e-3  # the digits preset's learning rate
DEFAULT_BUDGET = 2 * 2**30
MEASURES = ("orig_logits_l2", "linear")
CPU = torch.device("cpu")


def digits_case(num_probes: int | None = None) -> Case:
    """The digits MLP's snapshot of :func:`replay.bench.make_case` with the first ``num_probes``
    (None: all 1,797) digits images as probes: inputs ``[P, 64]``, classes ``[P]``."""
    x_train, y_train, x_test, y_test = digits()
    x, y = torch.cat([x_train, x_test]), torch.cat([y_train, y_test])
    if num_probes is not None and not 1 <= num_probes <= len(x):
        raise ReplayError(f"the digits have {len(x)} images; asked for {num_probes} probes")
    count = len(x) if num_probes is None else num_probes
    return replace(make_case("digits", 10), name="digits (all images)", inputs=x[:count], targets=y[:count])


def first_order(
    case: Case, update: UpdateConfig, form: str, budget: int | None
) -> tuple[Tensor, Tensor, dict[str, str]]:
    """``ntk`` ``[P, P]`` and ``linear`` ``[P, P, C]`` of ``case``'s snapshot under ``update`` (one
    proportional to the gradient) from a :class:`TangentKernel` in ``form``, in blocks of rows
    within ``budget`` bytes (None: every row at once, unchecked); and the form of each module."""
    model = build_model(case.spec.model).eval()
    params = {k: v.double() for k, v in case.snapshot.params.items()}
    buffers = {k: v.double() for k, v in case.snapshot.buffers.items()}
    kernel = TangentKernel(model, params, buffers, case.inputs.double(), "vmap", form, budget)
    scale = gradient_scale(update)
    assert scale is not None, "an update proportional to the gradient"
    grads = scale * output_gradients(case.spec.loss, kernel.outputs, case.targets)  # [P, C]
    ntk, linear = [], []
    for rows in torch.arange(len(case.inputs)).split(kernel.rows_per_block()):
        ntk.append(kernel.ntk(rows))
        linear.append(kernel.parts(rows, output_grads=grads[rows], by_module=False)[0])
    return torch.cat(ntk), torch.cat(linear), kernel.forms


def loop_rows(case: Case, update: UpdateConfig, rows: Tensor) -> tuple[Tensor, Tensor]:
    """The plain loop in float64 on the updated probes ``rows`` ``[R]``: base outputs ``[P, C]``
    and the outputs of every probe after each row's step ``[R, P, C]``."""
    model = build_model(case.spec.model).double().eval()
    model.load_state_dict(case.snapshot.params | case.snapshot.buffers)
    x = case.inputs.double()
    make_optimizer = RULES[update.rule].reference(update, case.snapshot.optimizer)
    with torch.no_grad():
        base = forward(model, x)
    new = []
    for clone in stepped_copies(model, make_optimizer, case.spec.loss, x[rows], case.targets[rows]):
        with torch.no_grad():
            new.append(forward(clone, x))
    return base, torch.stack(new)


def measured(fn: Callable[[], Any], repeats: int) -> tuple[float, int, Any]:
    """Seconds of a first call of ``fn`` (with ``repeats``: the median of that many calls after
    it), the peak memory of the first call (bytes) and the last result."""
    with PeakMemory(CPU) as memory:
        start = time.perf_counter()
        result = fn()
        times = [time.perf_counter() - start]
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:] or times), memory.peak, result


def relative_difference(a: Tensor, b: Tensor) -> float:
    """``max |a - b| / max |b|``."""
    return ((a - b).abs().max() / b.abs().max()).item()


def run_benchmark(
    num_probes: int | None = None,
    budget: int = DEFAULT_BUDGET,
    lr: float = DIGITS_LR,
    loop_count: int = 50,
    repeats: int = 0,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time the four paths of the module docstring, print their table with ``echo`` and return
    everything as a JSON-able dict."""
    case = digits_case(num_probes)
    count = len(case.inputs)
    update = UpdateConfig("sgd", lr=lr)
    load = os.getloadavg()
    echo(
        f"digits MLP, {count} probes, {sum(v.numel() for v in case.snapshot.params.values())} weights, "
        f"sgd lr {lr:g}, float64; cpu ({os.cpu_count()} cores), {torch.get_num_threads()} threads, load "
        f"average {load[0]:.2f}, torch {torch.__version__}; memory budget {budget / 2**30:.2f} GiB"
    )
    timings: dict[str, tuple[float, int, Any]] = {}
    for form, limit in (("gram", budget), ("jacobian", None)):  # the baseline may exceed the budget: shown
        timings[form] = measured(functools.partial(first_order, case, update, form, limit), repeats)
    config = ReplayConfig(update, measures=MEASURES, precision="auto", memory_budget=budget, ntk=True)
    engine = Engine(case.spec, case.inputs, case.targets, config)
    timings["engine"] = measured(lambda: engine.replay_snapshot(case.snapshot), repeats)
    rows = torch.linspace(0, count - 1, min(loop_count, count)).round().long().unique()
    timings["loop"] = measured(lambda: loop_rows(case, update, rows), repeats)
    ntk, linear, forms = timings["gram"][2]
    result = timings["engine"][2]
    base, new = timings["loop"][2]
    gram_linear = evaluate(  # S_linear from gram's linear change, as the engine computes it
        resolve_measures(("linear",), "classification"),
        result.base_outputs,
        {"linear": linear},
        torch.arange(count),
        config.ratio_eps,
    )
    loop_orig = evaluate(
        resolve_measures(("orig_logits_l2",), "classification"),
        base,
        {"finite": new - base},
        rows,
        config.ratio_eps,
    )
    agreement = {
        "jacobian_ntk": relative_difference(timings["jacobian"][2][0], ntk),
        "jacobian_linear": relative_difference(timings["jacobian"][2][1], linear),
        "engine_ntk": relative_difference(result.ntk, ntk),
        "engine_linear": relative_difference(result.measures["linear"], gram_linear["linear"]),
        "engine_orig_against_loop": relative_difference(
            result.measures["orig_logits_l2"][rows], loop_orig["orig_logits_l2"]
        ),
    }
    scale = {"gram": 1.0, "jacobian": 1.0, "engine": 1.0, "loop": count / len(rows)}
    paths = {
        name: {
            "seconds": seconds * scale[name],
            "peak_bytes": peak,
            "within_budget": peak <= budget,
        }
        for name, (seconds, peak, _) in timings.items()
    }
    for entry in paths.values():
        entry["over_gram"] = entry["seconds"] / paths["gram"]["seconds"]
    paths["loop"]["measured_seconds"] = timings["loop"][0]
    report = {
        "date": datetime.date.today().isoformat(),
        "device": f"cpu ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "load_average": load,
        "torch": torch.__version__,
        "probes": count,
        "params": sum(v.numel() for v in case.snapshot.params.values()),
        "update": update.effective(),
        "budget_bytes": budget,
        "repeats": repeats,
        "forms": forms,
        "engine_arithmetic": result.arithmetic,
        "loop_rows": len(rows),
        "loop_scale": scale["loop"],
        "paths": paths,
        "agreement": agreement,
        "agrees": all(v <= AGREEMENT_BAR for k, v in agreement.items() if k != "engine_orig_against_loop")
        and agreement["engine_orig_against_loop"] <= PRECISION_BAR,
    }
    _echo(report, echo)
    return report


def _echo(report: dict[str, Any], echo: Callable[[str], None]) -> None:
    """Print the table and the agreements of :func:`run_benchmark`'s ``report``."""
    labels = {
        "gram": "gram: ntk + linear, per-layer Gram products",
        "jacobian": "jacobian: ntk + linear, materialised per-sample Jacobians",
        "engine": f"engine: orig + linear + ntk ({report['engine_arithmetic']})",
        "loop": f"loop: orig, {report['loop_rows']} rows x {report['loop_scale']:.2f}",
    }
    echo(f"{'path':<60}{'seconds':>9}{'/ gram':>8}{'peak MiB':>10}  within budget")
    for name, entry in report["paths"].items():
        echo(
            f"{labels[name]:<60}{entry['seconds']:>9.3f}{entry['over_gram']:>8.1f}"
            f"{entry['peak_bytes'] / 2**20:>10.0f}  {'yes' if entry['within_budget'] else 'NO'}"
        )
    loop = report["paths"]["loop"]
    echo(
        f"loop: {loop['measured_seconds']:.3f} s measured on {report['loop_rows']} updated probes against all "
        f"{report['probes']}, scaled by {report['probes']} / {report['loop_rows']}"
    )
    echo(
        "largest relative difference (max |a - b| / max |b|): "
        + ", ".join(f"{k} {v:.1e}" for k, v in report["agreement"].items())
        + f"; bars {AGREEMENT_BAR:g} (orig against the loop: {PRECISION_BAR:g}): "
        + ("met" if report["agrees"] else "MISSED")
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m replay.kernel_bench", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--probes", type=int, default=None, help="probes (default: all 1,797 images)")
    parser.add_argument(
        "--memory-budget", type=float, default=DEFAULT_BUDGET / 2**30, help="GiB (default: %(default)g)"
    )
    parser.add_argument(
        "--lr", type=float, default=DIGITS_LR, help="sgd learning rate (default: %(default)g)"
    )
    parser.add_argument(
        "--loop-rows",
        type=int,
        default=50,
        help="updated probes the plain loop is timed on (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="timed calls after the first, which then is a warm-up (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: %(default)s, the steadier timing on a shared machine)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    for name, least in (("probes", 1), ("loop_rows", 1), ("repeats", 0), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}")
    if args.memory_budget <= 0 or args.lr <= 0:
        parser.error("--memory-budget and --lr must be positive")
    torch.set_num_threads(args.threads)
    try:
        report = run_benchmark(
            args.probes, int(args.memory_budget * 2**30), args.lr, args.loop_rows, args.repeats
        )
    except ElasticityError as e:  # too many probes, or a path that cannot fit the budget
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0 if report["agrees"] else 1)


if __name__ == "__main__":
    main()
