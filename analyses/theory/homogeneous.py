"""Weight d-homogeneous, feature-linear predictors (SPEC §6.3; model ``diagonal_homogeneous``).

Model: ``f(x) = <w^d, x> = sum_k w_k^d x_k``, ``w`` ``[n]``, ``d >= 1`` an integer (powers
elementwise; a diagonal linear network of depth ``d`` with tied weights). One output; per-sample
loss ``0.5 (f(x) - y)^2``.

One step. With ``r = f(x) - y`` the per-sample gradient is ``g = d r w^(d-1) * x`` and the ``sgd``
step ``U_i = -lr (d r_i w^(d-1) * x_i + wd w)`` ``[n]``. By the binomial theorem, elementwise,
``(w + U)^d - w^d = sum_{m=1..d} C(d, m) w^(d-m) U^m``, so the exact change is the polynomial of
degree ``d`` in ``lr``::

    D_ij = sum_{m=1..d} C(d, m) <w^(d-m) * U_i^m, x_j>

(no difference of two nearly equal forwards is taken). First order (``m = 1``):
``L_ij = d <w^(d-1) * U_i, x_j> = -lr d (d r_i <w^(2d-2) * x_i, x_j> + wd <w^d, x_j>)``; for
``wd = 0``, ``S(x_i, x_j) = |<w^(2d-2) * x_i, x_j>| / <w^(2d-2) * x_i, x_i>``: an inner product
weighted by ``w^(2d-2)``, weights that move with training (for ``d = 1``, a linear model, they do
not, and ``D = L``).

Flow: ``grad R(w) = d w^(d-1) * (X^T r) / N + wd w``; no closed form in general, integrated
numerically.
"""

from __future__ import annotations

from math import comb
from typing import Self

import numpy as np
from torch import nn

from analyses.theory.base import TheoryModel
from recorder.models import DiagonalHomogeneous


class Homogeneous(TheoryModel):
    """``f(x) = <w^d, x>``; ``w`` ``[n]``, ``d`` the degree."""

    factory = "diagonal_homogeneous"
    param = "w"

    def __init__(self, d: int):
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ValueError(f"the degree d must be a positive integer, got {d!r}")
        self.d = d

    @classmethod
    def from_model(cls, model: nn.Module) -> Self:
        assert isinstance(model, DiagonalHomogeneous), type(model)  # built by the factory
        return cls(model.d)

    def forward(self, w, x):
        return (x @ w**self.d)[:, None]

    def _steps(self, w, x, y, lr, wd) -> np.ndarray:
        """The ``sgd`` steps ``U`` ``[P, n]``."""
        r = self.forward(w, x)[:, 0] - y[:, 0]
        return -lr * (self.d * r[:, None] * w ** (self.d - 1) * x + wd * w)

    def exact_change(self, w, x, y, lr, wd=0.0):
        u = self._steps(w, x, y, lr, wd)
        terms = (comb(self.d, m) * w ** (self.d - m) * u**m for m in range(1, self.d + 1))
        return (sum(terms) @ x.T)[:, :, None]

    def linear_change(self, w, x, y, lr, wd=0.0):
        return ((self.d * w ** (self.d - 1) * self._steps(w, x, y, lr, wd)) @ x.T)[:, :, None]

    def grad(self, w, x, y, wd=0.0):
        r = self.forward(w, x)[:, 0] - y[:, 0]
        return self.d * w ** (self.d - 1) * (x.T @ r) / len(x) + wd * w
