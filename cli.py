"""Command line: record a preset, replay a run into S_rel arrays, analyze, and the demo.

Every command has ``--help``; usage errors exit with status 2, and a bad run directory or input
gives a one-line error (status 1), never a traceback.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import click

from recorder.rundir.errors import ElasticityError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gb": 2**30,
    "gib": 2**30,
}


class MemorySize(click.ParamType):
    """A byte count such as ``512MiB`` or ``4GiB``."""

    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number) :].strip()
        try:
            if unit not in _UNITS:
                raise ValueError
            return int(float(number) * _UNITS[unit])
        except ValueError:
            self.fail(f"{value!r} is not a size such as 512MiB or 4GiB", param, ctx)


memory_budget_option = click.option(
    "--memory-budget",
    type=MemorySize(),
    default=None,
    help="Bytes for stacked weight copies, e.g. 2GiB [default: from the device].",
)


def _fail_cleanly(fn):
    """Turn the library's input errors into one-line click errors (exit status 1)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ElasticityError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def _config_help(config_cls: type) -> str:
    lines = []
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Local elasticity (S_rel): record training, replay it offline, analyze the result."""


@main.command("presets")
def presets_cmd() -> None:
    """List the training presets and their settings."""
    from recorder.presets import PRESETS

    for preset in PRESETS.values():
        click.echo(f"{preset.name}: {preset.help}")
        click.echo(_config_help(preset.config_cls))


@main.command()
@click.argument("preset")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a preset setting (repeatable); `cli.py presets` lists them.",
)
@_fail_cleanly
def record(preset: str, run_dir: Path, overrides: tuple[str, ...]) -> None:
    """Train PRESET with the recorder attached, writing the run to RUN_DIR."""
    from recorder.presets import PRESETS, apply_overrides

    if preset not in PRESETS:
        raise click.BadParameter(
            f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}", param_hint="PRESET"
        )
    spec = PRESETS[preset]
    try:
        config = apply_overrides(spec.config_cls(), overrides)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--set") from None
    start = time.perf_counter()
    spec.record(run_dir, config)
    click.echo(f"recorded {preset} into {run_dir} in {time.perf_counter() - start:.1f} s")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, readable=False))  # RunDir says what is wrong
@click.option(
    "--update",
    "rule",
    type=click.Choice(["adam-fresh", "sgd", "recorded"]),
    default="adam-fresh",
    show_default=True,
    help="Virtual update rule U (SPEC §2).",
)
@click.option(
    "--lr",
    type=float,
    default=None,
    help="Learning rate of sgd / adam-fresh [default: 1e-4]; recorded uses the recorded one.",
)
@click.option("--eps", type=float, default=None, help="Adam epsilon of adam-fresh [default: 1e-8].")
@click.option(
    "--betas", type=(float, float), default=None, help="Adam betas of adam-fresh [default: 0.9 0.999]."
)
@click.option("--weight-decay", type=float, default=None, help="Weight decay of the sgd rule [default: 0].")
@click.option("--measures", default=None, help="Comma-separated measures [default: all for the task].")
@click.option(
    "--precision",
    type=click.Choice(["auto", "mixed", "difference32", "float64", "float32"]),
    default="auto",
    show_default=True,
    help="Arithmetic of the replay (README, Precision); every mode but float64 checks its error "
    "and refuses beyond --tolerance.",
)
@click.option(
    "--tolerance",
    type=float,
    default=None,
    help="Largest accepted estimated relative error of the measures [default: 1e-2].",
)
@click.option(
    "--ratio-eps",
    type=float,
    default=None,
    help="eps in S = N / (N_self + eps) [default: 1e-8]; use 0 for kl under tiny sgd steps.",
)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda or cuda:1.")
@memory_budget_option
@click.option("--name", default=None, help="Store name: RUN_DIR/NAME.zarr [default: the update rule].")
@click.option("--include-self", is_flag=True, help="Keep self pairs i = j in the same-class aggregates.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option(
    "--skip-corrupt",
    is_flag=True,
    help="Skip snapshots whose files are missing, truncated or corrupted (a warning names each).",
)
@click.option(
    "--allow-factory",
    "factories",
    multiple=True,
    metavar="MODULE:FUNCTION",
    help="Import a model factory that is not registered (runs that module's code: only code you trust).",
)
@_fail_cleanly
def replay(
    run_dir: Path,
    rule: str,
    lr: float | None,
    eps: float | None,
    betas: tuple[float, float] | None,
    weight_decay: float | None,
    measures: str | None,
    precision: str,
    tolerance: float | None,
    ratio_eps: float | None,
    device: str,
    memory_budget: int | None,
    name: str | None,
    include_self: bool,
    no_progress: bool,
    skip_corrupt: bool,
    factories: tuple[str, ...],
) -> None:
    """Replay the snapshots of RUN_DIR into S_rel arrays (RUN_DIR/NAME.zarr); resumable.

    RUN_DIR may be a run group (several seeds of one preset): each run is replayed in turn.
    """
    from recorder.rundir.errors import ReplayError
    from replay.config import ReplayConfig, UpdateConfig
    from replay.run import replay as run_replay

    if rule == "recorded" and lr is not None:
        raise click.BadParameter("the recorded rule uses the recorded learning rate", param_hint="--lr")
    given = {"lr": lr, "eps": eps, "betas": betas, "weight_decay": weight_decay}
    options: dict[str, Any] = {
        "precision": precision,
        "device": device,
        "include_self": include_self,
        "measures": tuple(m.strip() for m in measures.split(",")) if measures else None,
        "tolerance": tolerance,
        "ratio_eps": ratio_eps,
        "memory_budget": memory_budget,
        "name": name,
    }
    try:
        update = UpdateConfig(rule=rule, **{k: v for k, v in given.items() if v is not None})
        config = ReplayConfig(update=update, **{k: v for k, v in options.items() if v is not None})
    except ReplayError as e:
        raise click.UsageError(str(e)) from None
    from recorder.models import load_external_factory
    from recorder.rundir.group import is_group, read_group

    for target in factories:
        try:
            load_external_factory(target)
        except (ImportError, AttributeError, ValueError) as e:
            raise click.BadParameter(str(e), param_hint="--allow-factory") from None
    members = read_group(run_dir).members if is_group(run_dir) else [run_dir]
    for member in members:
        if len(members) > 1:
            click.echo(f"run {member}")
        run_replay(member, config, progress=not no_progress, skip_corrupt=skip_corrupt)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder [default: RUN_DIR/analysis].",
)
@click.option(
    "--include-self", is_flag=True, help="Include self pairs in class-pair aggregates (the paper's way)."
)
@_fail_cleanly
def analyze(run_dir: Path, out: Path | None, include_self: bool) -> None:
    """Figures, summary.json and report.html for every replay store in RUN_DIR."""
    from analyses.report import analyze as run_analyze
    from analyses.report import format_table

    summary = run_analyze(run_dir, out_dir=out, include_self=include_self)
    click.echo(format_table(summary))
    click.echo(f"figures, summary.json and report.html in {summary['out_dir']}")


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"))
@_fail_cleanly
def demo(out_dir: Path) -> None:
    """Record the digits preset, replay it and analyze it: the whole path in about two minutes."""
    from analyses.report import analyze as run_analyze
    from analyses.report import format_table
    from recorder.presets import PRESETS
    from replay.config import ReplayConfig, UpdateConfig
    from replay.run import replay as run_replay

    run_dir = out_dir / "digits"
    if (run_dir / "spec.json").exists():
        click.echo(f"{run_dir} already holds a recording: replaying it (delete it to record afresh)")
    else:
        click.echo(f"[1/3] recording the digits preset into {run_dir}")
        preset = PRESETS["digits"]
        preset.record(run_dir, preset.config_cls())
    click.echo("[2/3] replaying: adam-fresh (the paper's update) and recorded (the training's own)")
    for rule in ("adam-fresh", "recorded"):
        run_replay(run_dir, ReplayConfig(update=UpdateConfig(rule=rule)), progress=True)
    click.echo("[3/3] analyzing")
    summary = run_analyze(run_dir)
    click.echo(format_table(summary))
    click.echo(
        f"\nrun directory: {run_dir}\nreplay stores: {', '.join(str(p) for p in sorted(run_dir.glob('*.zarr')))}"
        f"\nreport: {Path(summary['out_dir']) / 'report.html'}"
    )


@main.command()
@click.option(
    "--case",
    "cases",
    multiple=True,
    type=click.Choice(["digits", "small_cnn", "mlp_large", "resnet18", "resnet18_240"]),
    help="A case to run (repeatable) [default: all of the device's].",
)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option("--probes", type=int, default=None, help="P for every case [default: each case's own].")
@click.option(
    "--update",
    "rule",
    type=click.Choice(["adam-fresh", "sgd"]),
    default="adam-fresh",
    show_default=True,
    help="Virtual update rule.",
)
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Learning rate of the update.")
@click.option(
    "--repeats",
    type=int,
    default=3,
    show_default=True,
    help="Timed rounds (each runs every candidate, the loop and the floor once).",
)
@memory_budget_option
@click.option("--no-overhead", is_flag=True, help="Skip the recorder-overhead measurement.")
@click.option("--grow", is_flag=True, help="Also time the digits MLP against P and the number of snapshots.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write every number to this JSON file.",
)
@_fail_cleanly
def bench(
    cases: tuple[str, ...],
    device: str,
    probes: int | None,
    rule: str,
    lr: float,
    repeats: int,
    memory_budget: int | None,
    no_overhead: bool,
    grow: bool,
    json_path: Path | None,
) -> None:
    """Time the replay engine against the paper's plain loop and the one-forward-pass floor."""
    import json

    from replay.bench import run_benchmark

    report = run_benchmark(
        cases or None,
        device=device,
        probes=probes,
        rule=rule,
        lr=lr,
        repeats=repeats,
        memory_budget=memory_budget,
        overhead=not no_overhead,
        grow=grow,
        echo=click.echo,
    )
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=1))
        click.echo(f"wrote {json_path}")


@main.command()
@click.argument("family")
@click.option(
    "--run",
    "run_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="A recorded run of this family: overlay its replayed S_rel on the closed form.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("theory-out"),
    show_default=True,
    help="Output folder for the figures.",
)
@_fail_cleanly
def theory(family: str, run_dir: Path | None, out: Path) -> None:
    """Closed-form S_rel of a theory FAMILY along gradient flow (SPEC §6)."""
    from analyses.theory import FAMILIES, plot_family

    if family not in FAMILIES:
        raise click.BadParameter(
            f"unknown family {family!r}; choose from {', '.join(FAMILIES)}", param_hint="FAMILY"
        )
    for path in plot_family(family, out, run_dir=run_dir):
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
