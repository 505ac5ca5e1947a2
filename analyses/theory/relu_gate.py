"""A single ReLU gate (SPEC §6.2; model ``relu_gate``).

Model: ``f(x) = relu(w . x)``, ``w`` ``[n]``, one output. Per-sample loss ``0.5 (f(x) - y)^2``.

One step. With ``a = w . x`` the per-sample gradient is ``g = c x``, ``c = (relu(a) - y) 1[a > 0]``
(torch's ReLU has derivative 0 at 0). The ``sgd`` step ``U_i = -lr (c_i x_i + wd w)`` moves the
pre-activation at ``x_j`` by ``delta_ij = U_i . x_j = -lr (c_i (x_i . x_j) + wd a_j)``, exactly (the
pre-activation is linear in ``w``). The output change is piecewise exact::

    D_ij = relu(a_j + delta_ij) - relu(a_j)
         = delta_ij           if a_j > 0 and a_j + delta_ij > 0   (stays active)
         = -a_j               if a_j > 0 >= a_j + delta_ij         (switched off)
         = a_j + delta_ij     if a_j <= 0 < a_j + delta_ij         (switched on)
         = 0                  otherwise                            (stays inactive)

First order: ``L_ij = 1[a_j > 0] delta_ij``; for ``wd = 0`` and an active ``x_i``,
``S(x_i, x_j) = 1[a_j > 0] |x_i . x_j| / ||x_i||^2``. An inactive ``x_i`` (``c_i = 0``) moves
nothing but the decay; inactive ``x_j`` see nothing to first order: same-side pairs carry all the
elasticity.

Flow: ``grad R(w) = X^T c / N + wd w`` (``c`` ``[N]`` as above), integrated numerically; the
right-hand side jumps where a training sample crosses ``a = 0``.
"""

from __future__ import annotations

from typing import Self

import numpy as np
from torch import nn

from analyses.theory.base import TheoryModel


class ReluGate(TheoryModel):
    """``f(x) = relu(w . x)``; ``w`` ``[n]``."""

    factory = "relu_gate"
    param = "w"

    @classmethod
    def from_model(cls, model: nn.Module) -> Self:
        return cls()

    def forward(self, w, x):
        return np.maximum(x @ w, 0.0)[:, None]

    @staticmethod
    def _coefficients(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``c = (relu(a) - y) 1[a > 0]`` ``[N]``: the per-sample gradient is ``c_i x_i``."""
        a = x @ w
        return np.where(a > 0, a - y[:, 0], 0.0)

    def _shifts(self, w, x, y, lr, wd) -> tuple[np.ndarray, np.ndarray]:
        """Pre-activations ``a`` ``[1, P]`` and their shifts ``delta`` ``[P, P]`` (row: the step)."""
        a = (x @ w)[None, :]
        return a, -lr * (self._coefficients(w, x, y)[:, None] * (x @ x.T) + wd * a)

    def exact_change(self, w, x, y, lr, wd=0.0):
        a, delta = self._shifts(w, x, y, lr, wd)
        after = a + delta
        return np.where(a > 0, np.where(after > 0, delta, -a), np.maximum(after, 0.0))[:, :, None]

    def linear_change(self, w, x, y, lr, wd=0.0):
        a, delta = self._shifts(w, x, y, lr, wd)
        return np.where(a > 0, delta, 0.0)[:, :, None]

    def grad(self, w, x, y, wd=0.0):
        return x.T @ self._coefficients(w, x, y) / len(x) + wd * w
