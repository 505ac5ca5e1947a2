"""The replay configuration: which virtual update, which measures, in which precision.

One replay store holds one configuration; its JSON form (:meth:`ReplayConfig.to_json`) is the
store's ``config`` attribute, and :meth:`ReplayConfig.identity` decides whether an existing
store may be resumed with a given configuration.

Every field says in its metadata what it accepts, and the checks and the command line
(``cli.py``) are built from it: ``help`` (its text), ``choices`` (the accepted values; the
update rules are those declared in :data:`replay.rules.RULES`), ``check`` (a predicate and
what it demands, for values other than None), ``label`` (its name in errors), ``option`` (its
command-line option, when not ``--<name>``), ``unit`` (``"bytes"``: the command line takes sizes
such as 512MiB) and, for an :class:`UpdateConfig` setting, ``off`` (the value that leaves it
unapplied: only a rule that reads the setting may take another).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from recorder.rundir.errors import ReplayError
from recorder.rundir.files import to_json
from replay.rules import RULES

PRECISIONS = ("float64", "float32", "difference32", "mixed", "auto")
STRATEGIES = ("auto", "vmap", "loop")

_POSITIVE = (lambda v: v > 0, "positive")
_NON_NEGATIVE = (lambda v: v >= 0, "non-negative")


def _validate(config: Any) -> None:
    """Raise :class:`ReplayError` for a field of the dataclass ``config`` outside its metadata's
    ``choices`` or failing its ``check``."""
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ReplayError(
                f"{meta.get('label', f.name)} {value!r} is not one of {', '.join(meta['choices'])}"
            )
        if "check" in meta and value is not None and not meta["check"][0](value):
            raise ReplayError(f"{f.name} must be {meta['check'][1]}, got {value}")


def _setting(name: str, default: Any, help: str, **metadata: Any) -> Any:
    """A field of :class:`UpdateConfig` whose help ends with the rules that read it (from the registry)."""
    users = [rule.name for rule in RULES.values() if name in rule.settings]
    return field(default=default, metadata={"help": f"{help} (read by {', '.join(users)}).", **metadata})


@dataclass(frozen=True)
class UpdateConfig:
    """The virtual update ``U(g)`` taken on each probe: a rule of :data:`replay.rules.RULES` and
    the settings it reads."""

    rule: str = field(
        default="adam-fresh",
        metadata={
            "help": "Update rule: "
            + "; ".join(f"'{r.name}': {r.help}" for r in RULES.values())
            + " (docs/update-rules.md).",
            "choices": RULES,
            "label": "update rule",
            "option": "--update",
        },
    )
    lr: float = _setting("lr", 1e-4, "Learning rate", check=_POSITIVE)
    eps: float = _setting("eps", 1e-8, "Adam's eps", check=_POSITIVE)
    weight_decay: float = _setting("weight_decay", 0.0, "Weight decay", check=_NON_NEGATIVE, off=0.0)
    betas: tuple[float, float] = _setting(
        "betas",
        (0.9, 0.999),
        "Adam's (beta1, beta2)",
        check=(lambda b: len(b) == 2 and all(0 <= x < 1 for x in b), "two numbers in [0, 1)"),
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        _validate(self)
        rule = RULES[self.rule]
        for f in dataclasses.fields(self):
            if (
                "off" in f.metadata
                and getattr(self, f.name) != f.metadata["off"]
                and f.name not in rule.settings
            ):
                users = [r.name for r in RULES.values() if f.name in r.settings]
                raise ReplayError(
                    f"{f.name} applies to the {' and '.join(map(repr, users))} rule{'s' * (len(users) > 1)} "
                    f"only ({rule.name!r} "
                    + (f"uses the recorded {f.name})" if rule.needs_state else f"has no {f.name})")
                )

    def effective(self) -> dict[str, Any]:
        """The fields that ``rule`` actually uses (the others do not change the results)."""
        return {"rule": self.rule} | {k: to_json(getattr(self, k)) for k in RULES[self.rule].settings}


@dataclass(frozen=True)
class ReplayConfig:
    """Everything that defines one replay store (and the resources it may use)."""

    update: UpdateConfig = field(
        default_factory=UpdateConfig, metadata={"help": "The virtual update rule and its options."}
    )
    measures: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "Measures to compute (default: every measure that applies to the run's task; "
            "docs/measures.md defines them).",
            "check": (lambda m: len(m) > 0, "at least one measure name (or None for all)"),
        },
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "Arithmetic of the replay: 'auto' (default, see below); 'float64' (resolves even tiny updates); "
            "'mixed' (base outputs, loss gradients and measures in float64, the output changes propagated "
            "layer by layer in float32 without ever subtracting two outputs: about 1e-7 relative error "
            "whatever the step); 'difference32' (loss gradients and measures in float64, the output "
            "changes as a difference of two float32 forward passes, the first also giving the base outputs: "
            "cheaper, and exact enough only for large steps); 'auto' (difference32 while its "
            "estimated error stays below 1e-4, else mixed, or float64 for models torch.fx cannot trace); "
            "'float32' (everything in float32). Every mode but float64 is checked against float64 on a "
            "few rows and refused when the estimated error exceeds the tolerance (docs/precision.md "
            "has the numbers).",
            "choices": PRECISIONS,
        },
    )
    ratio_eps: float = field(
        default=1e-8,
        metadata={
            "help": "eps in the ratio S[i, j] = N[i, j] / (N[i, i] + eps); 0 suits kl under tiny sgd steps.",
            "check": _NON_NEGATIVE,
        },
    )
    include_self: bool = field(
        default=False,
        metadata={
            "help": "Include the self pairs i = j in the class-pair aggregates (the paper's protocol)."
        },
    )
    tolerance: float = field(
        default=1e-2,
        metadata={
            "help": "Largest accepted estimated relative error of the measures: a float32 replay "
            "refuses beyond it, a float64 replay warns.",
            "check": _POSITIVE,
        },
    )
    device: str = field(default="cpu", metadata={"help": "Torch device to replay on, e.g. 'cpu', 'cuda'."})
    memory_budget: int | None = field(
        default=None,
        metadata={
            "help": "Bytes the stacked weight copies and their activations may use at once "
            "(default: a quarter of the device's free memory, page cache the kernel can reclaim included).",
            "check": (lambda v: v > 0, "a positive number of bytes"),
            "unit": "bytes",
        },
    )
    strategy: str = field(
        default="auto",
        metadata={
            "help": "How blocks of updated probes are evaluated: 'vmap' (stacked weight copies, one "
            "batched call), 'loop' (one call per probe) or 'auto' (chosen by model and probe count).",
            "choices": STRATEGIES,
        },
    )
    ntk: bool = field(
        default=False,
        metadata={
            "help": "Also store the empirical neural tangent kernel ntk[s, i, j] = sum_c <df_c(x_i)/dw, "
            "df_c(x_j)/dw> (docs/first-order.md)."
        },
    )
    module_split: bool = field(
        default=False,
        metadata={
            "help": "Also store each module's share of the first-order change J_j . U_i as class-pair "
            "means module_share[s, m, a, b], which sum over modules to the class-pair mean of linear "
            "(classification runs; docs/first-order.md)."
        },
    )
    only_module: str | None = field(
        default=None,
        metadata={
            "help": "Move only this module's parameters in the virtual step (e.g. 'layers.0'; the "
            "others held fixed): every measure of the step that perturbs that module alone. "
            "The store is named <update>.<module> unless --name says otherwise.",
            "check": (lambda m: bool(re.fullmatch(r"[A-Za-z0-9_.-]+", m)), "a module name such as 'layers.0'"),
        },
    )
    name: str | None = field(
        default=None,
        metadata={
            "help": "Store name: RUN_DIR/<name>.zarr (default: the update rule, with '.<module>' "
            "under --only-module)."
        },
    )

    def __post_init__(self) -> None:
        if self.measures is not None:
            object.__setattr__(self, "measures", tuple(self.measures))
        _validate(self)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.store_name):
            raise ReplayError(
                f"store name {self.store_name!r} must be letters, digits, '.', '_' or '-' (no path)"
            )

    @property
    def store_name(self) -> str:
        default = self.update.rule + (f".{self.only_module}" if self.only_module else "")
        return self.name or default

    @property
    def storage_dtype(self) -> str:
        """The dtype of the stored arrays: float32 for 'float32', float64 for every other precision."""
        return "float32" if self.precision == "float32" else "float64"

    def identity(self) -> dict[str, Any]:
        """What the stored numbers depend on: two configurations with equal identity may share a
        store (device, memory budget, strategy and name only decide where and how fast)."""
        return {
            "update": self.update.effective(),
            "measures": to_json(self.measures),
            "precision": self.precision,
            "ratio_eps": self.ratio_eps,
            "include_self": self.include_self,
            "tolerance": self.tolerance,
            "ntk": self.ntk,
            "module_split": self.module_split,
            "only_module": self.only_module,
        }

    def to_json(self) -> dict[str, Any]:
        """Every field, the update as the settings its rule uses (:meth:`UpdateConfig.effective`):
        a store of ``recorded`` shows no learning rate it never used. :meth:`from_json` gives the
        others their defaults."""
        return to_json(dataclasses.asdict(self)) | {"update": self.update.effective()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ReplayConfig:
        """Inverse of :meth:`to_json`; unknown or malformed fields raise :class:`ReplayError`."""
        try:
            fields = dict(obj)
            fields["update"] = UpdateConfig(**fields.get("update", {}))
            return cls(**fields)
        except TypeError as e:
            raise ReplayError(f"malformed replay configuration: {e}") from None
