"""Command line: record a preset, replay a run into S_rel arrays, analyze, and the demo.

Every command has ``--help``; usage errors exit with status 2, and a bad run directory or input
gives a one-line error (status 1), never a traceback.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

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


def setting_option(
    f: dataclasses.Field, hint: Any, choices: Sequence[str] | None = None, help: str | None = None
) -> click.Option:
    """The click option of one config dataclass field (of type ``hint``), from its metadata (see
    :mod:`replay.config`): ``--<name>`` or ``option``, the field's default and help, a choice of
    ``choices`` (default: the metadata's), a size for ``unit`` bytes, a flag for a bool, a
    comma-separated list for ``tuple[str, ...]``, a fixed number of values for another tuple."""
    meta = f.metadata
    kwargs: dict[str, Any] = {"default": f.default, "show_default": f.default is not None}
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    kind, args = typing.get_origin(kinds[0]) or kinds[0], typing.get_args(kinds[0])
    if choices is not None or "choices" in meta:
        kwargs["type"] = click.Choice(list(choices if choices is not None else meta["choices"]))
    elif meta.get("unit") == "bytes":
        kwargs |= {"type": MemorySize(), "metavar": "SIZE"}
    elif kind is bool:
        kwargs |= {"is_flag": True, "show_default": False}
    elif kind is tuple and args[-1] is Ellipsis:
        kwargs |= {"metavar": "A,B,...", "callback": _comma_list}
    else:
        kwargs["type"] = tuple(args) if kind is tuple else kind
    name = meta.get("option", "--" + f.name.replace("_", "-"))
    return click.Option([name, f.name], help=help or meta["help"], **kwargs)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _comma_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    return tuple(m.strip() for m in value.split(",")) if value else None


def setting_options(config_cls: type) -> list[click.Option]:
    """:func:`setting_option` for every field of the config dataclass ``config_cls``, the fields of
    a nested config (a field whose default is a config dataclass) in its place."""
    hints = typing.get_type_hints(config_cls)
    options = []
    for f in dataclasses.fields(config_cls):
        nested = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
        options += setting_options(nested) if nested else [setting_option(f, hints[f.name])]
    return options


def config_from(config_cls: type, values: dict[str, Any]) -> Any:
    """``config_cls`` from the values of its :func:`setting_options` (by field name)."""
    return config_cls(
        **{
            f.name: config_from(f.default_factory, values)
            if dataclasses.is_dataclass(f.default_factory)
            else values[f.name]
            for f in dataclasses.fields(config_cls)
        }
    )


class SettingsCommand(click.Command):
    """A command whose options from the config dataclasses, ``make_options()``, are made on first
    use and go after its arguments (building them imports torch: ``cli.py --help`` need not)."""

    def __init__(self, *args: Any, make_options: Callable[[], list[click.Option]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.make_options: Callable[[], list[click.Option]] | None = make_options

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if self.make_options is not None:
            at = sum(isinstance(p, click.Argument) for p in self.params)
            self.params[at:at] = self.make_options()
            self.make_options = None
        return super().get_params(ctx)


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
        default = f.default
        if default is dataclasses.MISSING:
            assert f.default_factory is not dataclasses.MISSING, f.name  # config fields all have defaults
            default = f.default_factory()
        lines.append(f"  {f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Local elasticity (S_rel): record training, replay it offline, analyze the result.

    Definitions of every measure, update rule and precision mode, and the store layout, are in
    the project's docs/ folder (docs/README.md).
    """


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
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start over where RUN_DIR holds a recording that did not finish: delete its files first.",
)
@_fail_cleanly
def record(preset: str, run_dir: Path, overrides: tuple[str, ...], overwrite: bool) -> None:
    """Train PRESET with the recorder attached, writing the run to RUN_DIR."""
    from recorder.presets import PRESETS, apply_overrides, check_settings
    from recorder.rundir.overwrite import prepare_run_dir

    if preset not in PRESETS:
        raise click.BadParameter(
            f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}", param_hint="PRESET"
        )
    spec = PRESETS[preset]
    try:
        config = apply_overrides(spec.config_cls(), overrides)
        check_settings(config)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--set") from None
    prepare_run_dir(run_dir, overwrite)
    start = time.perf_counter()
    try:
        spec.record(run_dir, config)
    except KeyboardInterrupt:
        raise click.ClickException(
            f"interrupted: {run_dir} keeps the snapshots written so far, marked as a recording that "
            "did not finish (replay uses them); rerun with --overwrite to record it from the start"
        ) from None
    except OSError as e:  # the disk, not the input: one line all the same
        raise click.ClickException(
            f"{e.filename}: {e.strerror}" if e.filename else e.strerror or str(e)
        ) from None
    click.echo(f"recorded {preset} into {run_dir} in {time.perf_counter() - start:.1f} s")


def _replay_options() -> list[click.Option]:
    from replay.config import ReplayConfig

    return setting_options(ReplayConfig)


def _refuse_unread_settings(ctx: click.Context, rule_name: str) -> None:
    """A usage error for an update setting given on the command line that the rule ``rule_name``
    does not read (it would change nothing)."""
    from replay.config import UpdateConfig
    from replay.rules import RULES

    rule, option = RULES[rule_name], {p.name: p.opts[0] for p in ctx.command.get_params(ctx)}
    for f in dataclasses.fields(UpdateConfig):
        given = ctx.get_parameter_source(f.name) != ParameterSource.DEFAULT
        if given and f.name not in rule.settings + ("rule",):
            reads = ", ".join(option[k] for k in rule.settings) or "none"
            why = (
                "it takes the recorded optimizer's own settings"
                if rule.needs_state
                else f"its settings: {reads}"
            )
            raise click.BadParameter(
                f"the {rule.name} rule does not read it ({why})", param_hint=option[f.name]
            )


@main.command(cls=SettingsCommand, make_options=_replay_options)
@click.argument("run_dir", type=click.Path(path_type=Path, readable=False))  # RunDir says what is wrong
@click.option("--no-progress", is_flag=True, help="No progress bar (the summary line is still printed).")
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
    help="Import a model factory that is not registered, from the current folder or the Python path "
    "(runs that module's code: only code you trust).",
)
@_fail_cleanly
def replay(
    run_dir: Path, no_progress: bool, skip_corrupt: bool, factories: tuple[str, ...], **settings: Any
) -> None:
    """Replay the snapshots of RUN_DIR into S_rel arrays (RUN_DIR/NAME.zarr); resumable.

    RUN_DIR may be a run group (several seeds of one preset): each run is replayed in turn.
    """
    from recorder.rundir.errors import ReplayError
    from replay.config import ReplayConfig
    from replay.run import replay as run_replay

    _refuse_unread_settings(click.get_current_context(), settings["rule"])
    try:
        config = config_from(ReplayConfig, settings)
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
@click.option(
    "--measures",
    metavar="M1,M2,...",
    callback=_comma_list,
    help="Analyze these measures only, and draw the class-pair grid of each "
    "[default: every stored measure; the grid of the headline one, kl where stored].",
)
@click.option(
    "--stores",
    metavar="S1,S2,...",
    callback=_comma_list,
    help="Analyze these replay stores only (RUN_DIR/S1.zarr, ...) [default: all].",
)
@click.option("--no-figures", is_flag=True, help="Numbers, summary.json and report.html only: no figures.")
@click.option(
    "--tensorboard",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write the S_rel curves as TensorBoard events into this folder (needs tensorboard).",
)
@_fail_cleanly
def analyze(
    run_dir: Path,
    out: Path | None,
    include_self: bool,
    measures: tuple[str, ...] | None,
    stores: tuple[str, ...] | None,
    no_figures: bool,
    tensorboard: Path | None,
) -> None:
    """Figures, summary.json and report.html for every replay store in RUN_DIR.

    RUN_DIR may be a run group: curves are then means over its runs.
    """
    from analyses.report import analyze as run_analyze
    from analyses.report import format_table

    summary = run_analyze(
        run_dir,
        out_dir=out,
        include_self=include_self,
        measures=None if measures is None else list(measures),
        stores=None if stores is None else list(stores),
        figures=not no_figures,
        tensorboard=tensorboard,
    )
    click.echo(format_table(summary))
    written = "summary.json and report.html" if no_figures else "figures, summary.json and report.html"
    click.echo(f"{written} in {summary['out_dir']}")
    if tensorboard is not None:
        click.echo(f"TensorBoard events in {tensorboard} (tensorboard --logdir {tensorboard})")


def _class_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    try:
        return [int(c) for c in value.split(",")] if value else None
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected class labels such as 3,5") from None


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--store", default=None, help="Replay store name [default: the run's only store].")
@click.option(
    "--measure",
    "measures",
    multiple=True,
    help="A stored measure to cluster on, or ntk for the stored neural tangent kernel (a replay with "
    "--ntk; cosine-normalised) (repeatable) [default: every stored measure, and ntk where stored].",
)
@click.option(
    "--classes",
    callback=_class_list,
    metavar="A,B,...",
    help="Probe classes to cluster [default: every class of the probes].",
)
@click.option(
    "--pca",
    "pca_components",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Principal components of the K-means baseline on PCA of the inputs.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder [default: RUN_DIR/analysis].",
)
@_fail_cleanly
def cluster(
    run_dir: Path,
    store: str | None,
    measures: tuple[str, ...],
    classes: list[int] | None,
    pca_components: int,
    out: Path | None,
) -> None:
    """He & Su's clustering of the probes of two or more classes on S_rel, at every snapshot.

    Kernel K-means and spectral clustering on the symmetrised S_rel (and on the cosine-normalised
    neural tangent kernel of a replay with --ntk) beside K-means on the probes' inputs and on
    their principal components; writes clustering.json and clustering.png (and, when the store
    holds linear and a finite measure of the same norm, the linearisation gap:
    <store>_linearisation.png and .json) into RUN_DIR/analysis. The probes' classes are the run's
    probe_classes where it stores them (digits-pairs: the digits), else the probe targets.
    """
    from analyses.clustering import cluster_run, format_table
    from analyses.linearisation import linearisation_gap, write_linearisation

    clustering, result = cluster_run(run_dir, store, measures or None, classes, out, pca_components)
    click.echo(format_table(clustering))
    out_dir = run_dir / "analysis" if out is None else out
    gap = linearisation_gap(result)
    if gap is not None:
        write_linearisation(gap, out_dir)
        click.echo(gap.summary())
    click.echo(f"clustering.json and clustering.png in {out_dir}")


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


def _bench_options() -> list[click.Option]:
    from replay.config import ReplayConfig, UpdateConfig
    from replay.rules import RULES

    update, resources = ({f.name: f for f in dataclasses.fields(c)} for c in (UpdateConfig, ReplayConfig))
    return [
        setting_option(
            update["rule"],
            str,
            choices=[name for name, rule in RULES.items() if not rule.needs_state],
            help="Virtual update rule, one that needs no recorded optimizer state (`cli.py replay "
            "--help` says what each does).",
        ),
        setting_option(update["lr"], float),
        setting_option(resources["memory_budget"], int | None),
    ]


@main.command(cls=SettingsCommand, make_options=_bench_options)
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
    "--repeats",
    type=int,
    default=3,
    show_default=True,
    help="Timed rounds (each runs every candidate, the loop and the floor once).",
)
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
        grow=grow,
        echo=click.echo,
    )
    if not no_overhead:
        import torch

        from recorder.bench import recorder_overhead

        report["recorder"] = r = recorder_overhead(torch.device(device))
        click.echo(
            f"recorder overhead ({r['model']}, snapshot every {r['snapshot_every']} steps): "
            f"{r['step_seconds'] * 1e3:.2f} ms -> {r['step_seconds_recorded'] * 1e3:.2f} ms a step, "
            f"{100 * r['overhead']:+.1f}% (median of paired blocks; {100 * r['inside_step']:.1f}% "
            f"inside recorder.step(), {100 * r['outside_step']:+.1f}% outside it; a block's last snapshot "
            f"written {r['write_seconds']:.2f} s after the block)"
        )
    if json_path is not None:
        from recorder.rundir.files import atomic_write_bytes

        atomic_write_bytes(json_path, json.dumps(report, indent=1).encode(), durable=False)
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
    """Closed-form S_rel of a theory FAMILY along gradient flow (the README's section Theory)."""
    from dataclasses import asdict

    from analyses.theory import FAMILIES, plot_family
    from recorder.presets import PRESETS

    if family not in FAMILIES:
        raise click.BadParameter(
            f"unknown family {family!r}; choose from {', '.join(FAMILIES)}", param_hint="FAMILY"
        )
    settings = {p: asdict(PRESETS[p].config_cls()) for p in FAMILIES[family].presets}
    for path in plot_family(family, out, run_dir=run_dir, settings=settings):
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
