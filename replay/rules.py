"""The update rules' declarations, and their registry: what each rule is called, what it does in
words, which settings it reads, whether it reads the recorded optimizer.

The configuration (:class:`~replay.config.UpdateConfig`), the command line and the store's checks
read the declarations of :data:`RULES`; nothing here imports torch, so ``cli.py replay --help``
lists the rules without loading it. :mod:`replay.updates` binds each declaration to its
arithmetic (the step, its ``torch.optim`` reference, the check of a recorded optimizer): a new
rule is one :func:`declare` here and one ``bind`` there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Declaration:
    """One update rule as the configuration sees it.

    - ``name``: its ``UpdateConfig.rule`` (and ``--update``) value; ``help``: what it does, in words;
    - ``settings``: the :class:`~replay.config.UpdateConfig` fields it reads (the others change
      nothing it computes, so they stay out of a store's identity);
    - ``needs_state``: whether it reads the snapshot's recorded optimizer (so not on a run, or a
      benchmark, without one).
    """

    name: str
    help: str
    settings: tuple[str, ...]
    needs_state: bool = False


RULES: dict[str, Declaration] = {}  # name -> declaration, in declaration order

# The optimizer types whose recorded state the ``recorded`` rule replays (its arithmetic:
# replay.updates).
RECORDED_OPTIMIZERS = ("SGD", "Adam", "AdamW")


def declare(declaration: Declaration) -> Declaration:
    """Add ``declaration`` to :data:`RULES`."""
    if declaration.name in RULES:
        raise ValueError(f"update rule {declaration.name!r} is declared twice")
    RULES[declaration.name] = declaration
    return declaration


declare(
    Declaration(
        "sgd",
        "-lr * (g + weight_decay * w), one step of torch.optim.SGD without momentum",
        settings=("lr", "weight_decay"),
    )
)
declare(
    Declaration(
        "adam-fresh",
        "one step of a brand-new torch.optim.Adam, about -lr * g / (|g| + eps): the paper's rule",
        settings=("lr", "eps", "betas"),
    )
)
declare(
    Declaration(
        "recorded",
        "the training optimizer's own next step from its recorded state "
        f"({', '.join(RECORDED_OPTIMIZERS)})",
        settings=(),
        needs_state=True,
    )
)
