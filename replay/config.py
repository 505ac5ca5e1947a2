"""The replay configuration: which virtual update, which measures, in which precision.

One replay store holds one configuration; its JSON form (:meth:`ReplayConfig.to_json`) is the
store's ``config`` attribute, and :meth:`ReplayConfig.identity` decides whether an existing
store may be resumed with a given configuration. Every field carries its help text in
``metadata["help"]`` (the CLI can build its options from it).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from recorder.rundir.errors import ReplayError
from recorder.rundir.files import to_json

RULES = ("sgd", "adam-fresh", "recorded")
PRECISIONS = ("float64", "float32", "difference32", "mixed", "auto")
STRATEGIES = ("auto", "vmap", "loop")


@dataclass(frozen=True)
class UpdateConfig:
    """The virtual update ``U(g)`` taken on each probe (SPEC §2)."""

    rule: str = field(
        default="adam-fresh",
        metadata={
            "help": "Update rule: 'sgd' (-lr * (g + weight_decay * w)), 'adam-fresh' (one step of a "
            "brand-new torch.optim.Adam, the paper's rule), or 'recorded' (the training optimizer's "
            "own next step from its recorded state)."
        },
    )
    lr: float = field(
        default=1e-4,
        metadata={"help": "Learning rate of 'sgd' and 'adam-fresh' ('recorded' uses the recorded one)."},
    )
    eps: float = field(default=1e-8, metadata={"help": "Adam's eps for 'adam-fresh'."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of 'sgd' (only)."})
    betas: tuple[float, float] = field(
        default=(0.9, 0.999), metadata={"help": "Adam's (beta1, beta2) for 'adam-fresh'."}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.rule not in RULES:
            raise ReplayError(f"update rule {self.rule!r} is not one of {', '.join(RULES)}")
        if not self.lr > 0:
            raise ReplayError(f"lr must be positive, got {self.lr}")
        if not self.eps > 0:
            raise ReplayError(f"eps must be positive, got {self.eps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ReplayError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ReplayError(f"weight_decay must be non-negative, got {self.weight_decay}")
        if self.weight_decay and self.rule != "sgd":
            raise ReplayError(
                "weight_decay applies to the 'sgd' rule only ('adam-fresh' is a plain fresh Adam; "
                "'recorded' uses the recorded weight decay)"
            )

    def effective(self) -> dict[str, Any]:
        """The fields that ``rule`` actually uses (the others do not change the results)."""
        used = {"sgd": ("lr", "weight_decay"), "adam-fresh": ("lr", "eps", "betas"), "recorded": ()}
        return {"rule": self.rule} | {k: to_json(getattr(self, k)) for k in used[self.rule]}


@dataclass(frozen=True)
class ReplayConfig:
    """Everything that defines one replay store (and the resources it may use)."""

    update: UpdateConfig = field(
        default_factory=UpdateConfig, metadata={"help": "The virtual update rule and its options."}
    )
    measures: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Measures to compute (default: every measure that applies to the run's task)."},
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
            "few rows and refused when the estimated error exceeds the tolerance."
        },
    )
    ratio_eps: float = field(
        default=1e-8, metadata={"help": "eps in the ratio S[i, j] = N[i, j] / (N[i, i] + eps)."}
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
            "refuses beyond it, a float64 replay warns."
        },
    )
    device: str = field(default="cpu", metadata={"help": "Torch device to replay on, e.g. 'cpu', 'cuda'."})
    memory_budget: int | None = field(
        default=None,
        metadata={
            "help": "Bytes the stacked weight copies and their activations may use at once "
            "(default: a quarter of the device's free memory, page cache the kernel can reclaim included)."
        },
    )
    strategy: str = field(
        default="auto",
        metadata={
            "help": "How blocks of updated probes are evaluated: 'vmap' (stacked weight copies, one "
            "batched call), 'loop' (one call per probe) or 'auto' (chosen by model and probe count)."
        },
    )
    name: str | None = field(
        default=None, metadata={"help": "Store name: RUN_DIR/<name>.zarr (default: the update rule)."}
    )

    def __post_init__(self) -> None:
        if self.measures is not None:
            object.__setattr__(self, "measures", tuple(self.measures))
            if not self.measures:
                raise ReplayError("measures must name at least one measure (or be None for all)")
        if self.precision not in PRECISIONS:
            raise ReplayError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.strategy not in STRATEGIES:
            raise ReplayError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if not self.ratio_eps >= 0:
            raise ReplayError(f"ratio_eps must be non-negative, got {self.ratio_eps}")
        if not self.tolerance > 0:
            raise ReplayError(f"tolerance must be positive, got {self.tolerance}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ReplayError(f"memory_budget must be a positive number of bytes, got {self.memory_budget}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.store_name):
            raise ReplayError(
                f"store name {self.store_name!r} must be letters, digits, '.', '_' or '-' (no path)"
            )

    @property
    def store_name(self) -> str:
        return self.name or self.update.rule

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
        }

    def to_json(self) -> dict[str, Any]:
        return to_json(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ReplayConfig:
        """Inverse of :meth:`to_json`; unknown or malformed fields raise :class:`ReplayError`."""
        try:
            fields = dict(obj)
            fields["update"] = UpdateConfig(**fields.get("update", {}))
            return cls(**fields)
        except TypeError as e:
            raise ReplayError(f"malformed replay configuration: {e}") from None

