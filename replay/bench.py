"""The benchmark behind ``cli.py bench``: the engine against the paper's procedure, on one snapshot.

For each case (a built-in model, a snapshot of it after a little training, ``P`` probes) it
times, in one process and on the same snapshot and probes:

- **loop**: the paper's procedure as the project implements it (:mod:`replay.reference`): per
  probe a deep copy, a fresh ``torch.optim`` optimizer, one step, all probes evaluated; float32,
  as the paper ran it; then the measures from their textbook formulas;
- **floor**: one float32 forward pass over all ``P x P`` (probe, probe) pairs at shared weights,
  the arithmetic no replay can avoid (loop and floor run with TF32 off on a GPU, like the engine);
- **engine**: :class:`~replay.engine.Engine` with the plan it chooses by itself (precision and
  strategy ``auto``), and in every arithmetic of :mod:`replay.plan` with each strategy (``vmap``,
  ``loop``), all computing the loop's measures (every one but ``linear``).

It prints the time of each (median of ``repeats`` rounds after a warm-up; each round runs every
candidate, the loop and the floor once in turn, so drift falls on all alike), the ratios loop /
engine and engine / floor, the peak memory, and the precision reached: the relative Frobenius
error of the ``orig`` and ``kl`` matrices against the float64 engine (the bar: 1e-3). It checks
that the strategy the engine chose is the fastest of the strategies it times (for the arithmetic
the engine ended with), and how the cost grows with ``P`` and with the number of snapshots.
(``cli.py bench`` adds the recorder's overhead on training steps, from :mod:`recorder.bench`.)
"""

from __future__ import annotations

import ctypes
import functools
import gc
import math
import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from recorder.datasets import digits, stratified_sample
from recorder.losses import batch_loss
from recorder.models import build_model
from recorder.rundir.snapshot import Snapshot
from recorder.rundir.spec import ModelSpec, RunSpec
from replay.config import ReplayConfig, UpdateConfig
from replay.engine import Engine, SnapshotResult
from replay.plan import ARITHMETIC, STRATEGIES, activations_per_sample
from replay.precision import no_tf32
from replay.reference import plain_changes, plain_measures
from replay.updates import RULES

PRECISION_BAR = 1e-3
COMPARED = ("orig_logits_l2", "orig_probs_l2", "kl")  # the measures whose error is reported
# what the loop computes: every classification measure but 'linear' (a Jacobian-vector product)
FINITE = ("orig_logits_l2", "orig_logits_l1", "orig_probs_l2", "orig_probs_l1", "kl", "kl_reverse", "seed_kl")
DEFAULT_PROBES = {
    "cpu": {"digits": 100, "small_cnn": 100, "resnet18": 8, "mlp_large": 500},
    "cuda": {"digits": 100, "small_cnn": 100, "resnet18": 60, "resnet18_240": 240, "mlp_large": 1020},
}
SCALING_PROBES = (20, 50, 100, 200, 400)
SCALING_SNAPSHOTS = (1, 4, 16)


@dataclass
class Case:
    """One benchmark case: a run spec, a snapshot and ``P`` probes (inputs ``[P, ...]``, classes ``[P]``)."""

    name: str
    spec: RunSpec
    snapshot: Snapshot
    inputs: Tensor
    targets: Tensor


# ----------------------------------------------------------------------------- cases


def _digits(per_class: int, image: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits preset's training data and ``per_class`` probes of each class (images ``[N, 1, 8, 8]``
    when ``image``, else ``[N, 64]``)."""
    x, y, _, _ = digits()
    index = stratified_sample(y.numpy(), per_class, seed=0)
    px, py = x[index], y[index]
    if image:
        x, px = x.view(-1, 1, 8, 8), px.view(-1, 1, 8, 8)
    return x, y, px, py


def _blobs(num: int, per_class: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random 3x32x32 images whose mean depends on the class (3 classes): ``[N, 3, 32, 32]``, ``[N]``."""
    labels = torch.arange(3).repeat_interleave(per_class)[:num] if per_class else torch.randint(3, (num,))
    images = torch.randn((len(labels), 3, 32, 32), generator=generator)
    return images + 0.5 * (labels.float() - 1).view(-1, 1, 1, 1), labels


def _train(model: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float) -> None:
    """``steps`` Adam steps on random mini-batches of 32 (so that the snapshot is not the initialization)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(len(x), (32,), generator=generator)
        optimizer.zero_grad()
        batch_loss("cross_entropy", model(x[batch]), y[batch]).backward()
        optimizer.step()


def make_case(name: str, num_probes: int) -> Case:
    """The case ``name`` (``digits``, ``small_cnn``, ``mlp_large``, ``resnet18``, ``resnet18_240``)
    with about ``num_probes`` probes (a multiple of the number of classes)."""
    torch.manual_seed(0)
    if name in ("digits", "mlp_large", "small_cnn"):
        image = name == "small_cnn"
        x, y, px, py = _digits(max(1, num_probes // 10), image)
        kwargs = (
            {"in_channels": 1, "width": 16, "image_size": 8}
            if image
            else {"in_features": 64, "hidden": [128]}
        )
        model_spec = ModelSpec("small_cnn" if image else "mlp", {"num_outputs": 10, **kwargs})
        model = build_model(model_spec)
        _train(model, x, y, steps=100, lr=1e-3)
    elif name.startswith("resnet18"):
        generator = torch.Generator().manual_seed(0)
        x, y = _blobs(96, 0, generator)
        px, py = _blobs(num_probes, -(-num_probes // 3), generator)
        model_spec = ModelSpec("resnet18_nonorm", {"num_outputs": 3})
        model = build_model(model_spec)
        _train(model, x, y, steps=3, lr=1e-4)
    else:
        raise ValueError(
            f"unknown case {name!r}; known: digits, small_cnn, mlp_large, resnet18, resnet18_240"
        )
    spec = RunSpec(
        model_spec, task="classification", loss="cross_entropy", num_outputs=10 if "resnet" not in name else 3
    )
    snapshot = Snapshot(
        step=0,
        params={k: v.detach().clone() for k, v in model.named_parameters()},
        buffers={k: v.detach().clone() for k, v in model.named_buffers()},
        optimizer=None,
    )
    return Case(name, spec, snapshot, px, py)


# ----------------------------------------------------------------------------- measuring


def _release_free_memory() -> None:
    """Hand the C allocator's free memory back to the system (glibc), so that the resident set
    grows again with what a block allocates."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above the start of the block, in bytes: the CUDA allocator's peak on a GPU,
    the resident set size sampled every millisecond on a CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self._start)
            self._stop.wait(0.001)

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_memory()
            self._start, self._stop = self._rss(), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, int, Any]:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call, the peak memory of the
    warm-up call (bytes) and the last result."""
    with PeakMemory(device) as memory:
        result = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), memory.peak, result


def timed_together(
    fns: Mapping[str, Callable[[], Any]], device: torch.device, repeats: int
) -> dict[str, tuple[float, int, Any]]:
    """:func:`timed` for several functions at once: one warm-up call each (its peak memory
    measured), then ``repeats`` rounds that call every function once, in a new random order each
    round, so that the drift of a shared machine, and what a call pays after another (the loop
    leaves the allocator's heap fragmented, say), falls on all alike. Per name: the
    median seconds, the warm-up's peak memory (bytes) and the last result."""
    peaks: dict[str, int] = {}
    results: dict[str, Any] = {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        with PeakMemory(device) as memory:
            results[name] = fn()
        peaks[name] = memory.peak
    shuffle = random.Random(0)
    for _ in range(repeats):
        for name in shuffle.sample(list(fns), len(fns)):
            fn = fns[name]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            results[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), peaks[name], results[name]) for name in fns}


def relative_error(measures: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    """Largest over :data:`COMPARED` of ``||S - S_ref||_F / ||S_ref||_F`` (finite reference entries)."""
    errors = []
    for name in COMPARED:
        ref = reference[name].double()
        finite = torch.isfinite(ref)
        diff = torch.where(finite, measures[name].double().cpu() - ref, 0).norm()
        errors.append((diff / torch.where(finite, ref, 0).norm()).item())
    return max(errors)


def case_model(case: Case, device: torch.device) -> nn.Module:
    """The model of ``case`` on ``device``, built once outside the timings (as the engine's is):
    the loop and the floor load the snapshot's weights into it each time."""
    return build_model(case.spec.model).eval().to(device)


def loop_measures(
    case: Case, model: nn.Module, update: UpdateConfig, device: torch.device
) -> dict[str, Tensor]:
    """The paper's procedure in float32 (:func:`replay.reference.plain_changes`) on ``model`` (the
    snapshot's weights loaded into it) and its measures."""
    model.load_state_dict(case.snapshot.params | case.snapshot.buffers)
    x, y = case.inputs.to(device), case.targets.to(device)
    optimizer = RULES[update.rule].reference(update, case.snapshot.optimizer)
    return plain_measures(*plain_changes(model, optimizer, case.spec.loss, x, y))


def floor(case: Case, model: nn.Module, device: torch.device, budget: int) -> Tensor:
    """One float32 forward pass of ``model`` over all ``P x P`` pairs at the snapshot's weights ->
    ``[P * P, C]``, in blocks of whole copies of the probe set within ``budget`` bytes."""
    params = {k: v.to(device) for k, v in (case.snapshot.params | case.snapshot.buffers).items()}
    x = case.inputs.to(device)
    per_copy = 4 * len(x) * activations_per_sample(model, x[:1]) * 2
    copies = max(1, min(len(x), budget // per_copy))
    with torch.no_grad():
        return torch.cat(
            [
                functional_call(model, params, (x.repeat(min(copies, len(x) - start), *[1] * (x.dim() - 1)),))
                for start in range(0, len(x), copies)
            ]
        )


# ----------------------------------------------------------------------------- the benchmark


def _engines(
    case: Case, update: UpdateConfig, device: torch.device, memory_budget: int | None
) -> dict[str, Engine]:
    """An engine on ``case`` per candidate: ``auto`` (its own plan) and every arithmetic and
    strategy, all computing :data:`FINITE`."""
    base = ReplayConfig(
        update, measures=FINITE, device=str(device), memory_budget=memory_budget, tolerance=math.inf
    )
    configs = {"auto": replace(base, precision="auto")} | {
        f"{arithmetic}/{strategy}": replace(base, precision=arithmetic, strategy=strategy)
        for arithmetic in ARITHMETIC
        for strategy in STRATEGIES
    }
    return {key: Engine(case.spec, case.inputs, case.targets, config) for key, config in configs.items()}


def _untf32(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` with TF32 off, like the engine: full float32 convolutions and matmuls on a GPU."""

    def run() -> Any:
        with no_tf32(device):
            return fn()

    return run


def _replayer(engine: Engine, snapshot: Snapshot) -> Callable[[], SnapshotResult]:
    """A call of ``engine`` on ``snapshot``."""
    return lambda: engine.replay_snapshot(snapshot)


def _time_case(
    case: Case,
    engines: Mapping[str, Engine],
    update: UpdateConfig,
    device: torch.device,
    repeats: int,
    budget: int,
) -> dict[str, tuple[float, int, Any]]:
    """:func:`timed_together` of every engine, the loop and the floor on ``case``."""
    fns = {key: _replayer(engine, case.snapshot) for key, engine in engines.items()}
    model = case_model(case, device)
    fns["loop"] = _untf32(lambda: loop_measures(case, model, update, device), device)
    fns["floor"] = _untf32(lambda: floor(case, model, device, budget), device)
    return timed_together(fns, device, repeats)


def _candidates(
    engines: Mapping[str, Engine], timings: Mapping[str, tuple[float, int, Any]]
) -> tuple[dict[str, dict[str, Any]], dict[str, Tensor]]:
    """Per engine its seconds, peak memory, plan, rows per chunk, estimated and actual error;
    and the reference measures (the float64 engine's) the errors are taken against."""
    candidates: dict[str, dict[str, Any]] = {}
    results: dict[str, SnapshotResult] = {}
    for key, engine in engines.items():
        seconds, memory, results[key] = timings[key]
        candidates[key] = {
            "seconds": seconds,
            "peak_bytes": memory,
            "plan": f"{results[key].arithmetic}/{engine.strategy}",  # auto: the one it settled on
            "rows_per_chunk": engine.rows_per_chunk(results[key].arithmetic),
            "error_estimate": results[key].error_estimate,
        }
    reference = results["float64/vmap"].measures
    for key, result in results.items():
        candidates[key]["error"] = relative_error(result.measures, reference)
    return candidates, reference


def bench_case(
    case: Case, update: UpdateConfig, device: torch.device, repeats: int, memory_budget: int | None
) -> dict[str, Any]:
    """Time loop, floor, the engine's own plan and every other arithmetic and strategy on ``case``;
    see the module docstring."""
    engines = _engines(case, update, device, memory_budget)
    budget = memory_budget or engines["auto"].budget
    timings = _time_case(case, engines, update, device, repeats, budget)
    (loop_seconds, loop_memory, loop), (floor_seconds, floor_memory, _) = timings["loop"], timings["floor"]
    candidates, reference = _candidates(engines, timings)
    chosen = candidates["auto"]
    arithmetic, strategy = chosen["plan"].split("/")
    by_strategy = {s: candidates[f"{arithmetic}/{s}"]["seconds"] for s in STRATEGIES}
    fastest = min(by_strategy, key=by_strategy.__getitem__)
    return {
        "case": case.name,
        "probes": len(case.inputs),
        "params": sum(v.numel() for v in case.snapshot.params.values()),
        "chosen": chosen["plan"],
        "candidates": candidates,
        "engine_seconds": chosen["seconds"],
        "engine_peak_bytes": chosen["peak_bytes"],
        "engine_error": chosen["error"],
        "loop_seconds": loop_seconds,
        "loop_peak_bytes": loop_memory,
        "loop_error": relative_error(loop, reference),
        "floor_seconds": floor_seconds,
        "floor_peak_bytes": floor_memory,
        "speedup": loop_seconds / chosen["seconds"],
        "over_floor": chosen["seconds"] / floor_seconds,
        "over_float32": chosen["seconds"] / candidates[f"float32/{strategy}"]["seconds"],
        "meets_bar": chosen["error"] <= PRECISION_BAR,
        "fastest_strategy": fastest,
        # the chosen strategy counts as the fastest within 10%, the noise of a shared machine
        "chosen_is_fastest": by_strategy[strategy] <= 1.1 * by_strategy[fastest],
    }


def scaling(
    device: torch.device, update: UpdateConfig, memory_budget: int | None, repeats: int
) -> dict[str, Any]:
    """Digits MLP: seconds per snapshot of the engine (its own plan), the loop and the floor for
    each ``P`` of :data:`SCALING_PROBES`, and the engine's total for each number of snapshots of
    :data:`SCALING_SNAPSHOTS` at ``P = 100`` (engine construction included)."""
    rows = []
    for num_probes in SCALING_PROBES:
        case = make_case("digits", num_probes)
        config = ReplayConfig(
            update, FINITE, precision="auto", device=str(device), memory_budget=memory_budget
        )
        engine, model = Engine(case.spec, case.inputs, case.targets, config), case_model(case, device)
        seconds, _, _ = timed(_replayer(engine, case.snapshot), device, repeats)
        loop_seconds = (
            timed(functools.partial(loop_measures, case, model, update, device), device, 1)[0]
            if num_probes <= 400
            else math.nan
        )
        floor_seconds, _, _ = timed(
            functools.partial(floor, case, model, device, engine.budget), device, repeats
        )
        rows.append({"probes": num_probes, "engine": seconds, "loop": loop_seconds, "floor": floor_seconds})
    case = make_case("digits", 100)
    totals = []
    for count in SCALING_SNAPSHOTS:
        start = time.perf_counter()
        config = ReplayConfig(
            update, FINITE, precision="auto", device=str(device), memory_budget=memory_budget
        )
        engine = Engine(case.spec, case.inputs, case.targets, config)
        for _ in range(count):
            engine.replay_snapshot(case.snapshot)
        totals.append({"snapshots": count, "seconds": time.perf_counter() - start})
    return {"by_probes": rows, "by_snapshots": totals}


def _echo_case(row: dict[str, Any], echo: Callable[[str], None]) -> None:
    """Print one case of :func:`bench_case`: its table row, then a line per candidate."""
    mark = "yes" if row["chosen_is_fastest"] else "NO"
    echo(
        f"{row['case']:<13}{row['probes']:>5} {row['chosen']:<19}{row['engine_seconds']:>9.3f}"
        f"{row['loop_seconds']:>9.3f}{row['floor_seconds']:>9.3f}{row['speedup']:>9.1f}"
        f"{row['over_floor']:>10.1f}{row['over_float32']:>8.2f}"
        f"{row['engine_error']:>9.1e}{row['loop_error']:>9.1e}{row['engine_peak_bytes'] / 2**20:>9.0f}"
        f"  {row['fastest_strategy']} ({mark})"
    )
    for key, c in row["candidates"].items():
        echo(
            f"    {key:<19}{c['seconds']:>9.3f} s  error {c['error']:.1e} (estimated {c['error_estimate']:.1e})"
            f"  peak {c['peak_bytes'] / 2**20:.0f} MiB  {c['rows_per_chunk']} rows a chunk"
        )


def run_benchmark(
    cases: Sequence[str] | None = None,
    device: str = "cpu",
    probes: int | None = None,
    rule: str = "adam-fresh",
    lr: float = 1e-4,
    repeats: int = 3,
    memory_budget: int | None = None,
    grow: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the benchmark and print its tables with ``echo``; returns everything as a JSON-able dict.

    ``cases``: names of :func:`make_case` (default: every case of :data:`DEFAULT_PROBES` for the
    device); ``probes``: one ``P`` for all cases (default: the case's own); ``rule`` / ``lr``: the
    update rule (one that needs no recorded optimizer state); ``grow``: the scaling tables (cost against ``P`` and against the number of snapshots).
    """
    target = torch.device(device)
    update = UpdateConfig(rule, lr=lr)
    defaults = DEFAULT_PROBES["cuda" if target.type == "cuda" else "cpu"]
    load = os.getloadavg()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(target)
        if target.type == "cuda"
        else f"cpu ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "load_average": load,
        "torch": torch.__version__,
        "update": update.effective(),
        "cases": [],
    }
    echo(
        f"device {report['device']}, {report['threads']} threads, load average {load[0]:.2f}, torch "
        f"{torch.__version__}, update {rule} lr {lr:g}; times are medians of {repeats} rounds (each in a "
        "random order) after a warm-up; "
        "the engine computes the loop's measures (all but linear); errors: relative Frobenius norm of "
        "orig and kl against float64"
    )
    echo(
        f"{'case':<13}{'P':>5} {'engine plan':<19}{'engine s':>9}{'loop s':>9}{'floor s':>9}{'loop/eng':>9}"
        f"{'eng/floor':>10}{'eng/f32':>8}{'err eng':>9}{'err loop':>9}{'peak MiB':>9}  fastest strategy"
    )
    for name in cases or list(defaults):
        row = bench_case(
            make_case(name, probes or defaults.get(name, 100)), update, target, repeats, memory_budget
        )
        report["cases"].append(row)
        _echo_case(row, echo)
    if grow:
        report["scaling"] = scaling(target, update, memory_budget, repeats)
        echo("digits MLP, seconds per snapshot:  P  engine  loop  floor")
        for r in report["scaling"]["by_probes"]:
            echo(f"  {r['probes']:>5} {r['engine']:>8.3f} {r['loop']:>8.3f} {r['floor']:>8.3f}")
        echo("digits MLP at P = 100, whole replay (engine built once): snapshots  seconds")
        for r in report["scaling"]["by_snapshots"]:
            echo(f"  {r['snapshots']:>5} {r['seconds']:>8.2f}")
    return report
