"""The published class-pair results of the paper (SPEC §5), as data, keyed by the preset that
reproduces each experiment.

``same_cross``: measure -> the time-averaged ``A[same] / mean A[cross]`` of each sampled class
(in the order of ``classes``), mean of 3 runs, self pairs included. The paper's ``orig`` is on
probabilities with an RMS norm, whose ratio equals the L2 one (``orig_probs_l2``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    data: str
    classes: tuple[int, ...]
    same_cross: dict[str, tuple[float, ...]]
    test_acc: float


PUBLISHED = {
    "cifar10-resnet18": Published(
        "CIFAR-10", (0, 1, 8), {"seed_kl": (1.17, 1.22, 1.27), "orig_probs_l2": (0.37, 0.43, 0.43)}, 0.771
    ),
    "svhn-resnet18": Published(
        "SVHN", (0, 2, 4), {"seed_kl": (1.21, 1.32, 1.25), "orig_probs_l2": (0.11, 0.54, 0.16)}, 0.860
    ),
    "cifar100-resnet18": Published(
        "CIFAR-100", (48, 53, 94), {"seed_kl": (1.06, 1.14, 1.22), "orig_probs_l2": (0.08, 0.14, 0.08)}, 0.936
    ),
}
# The measures of the paper's comparison (SPEC §5): the two it published and the true KL.
PAPER_MEASURES = ("seed_kl", "orig_probs_l2", "kl")
