"""Linear model on fixed random ReLU features with ridge (SPEC §6.1; model ``random_features``).

Model: ``h(x) = relu(V x)`` with ``V`` ``[p, n]`` fixed, ``f(x) = W^T h(x)`` with ``W`` ``[p, K]``
the only trained weights. Per-sample loss ``0.5 ||W^T h - y||^2``, ridge ``0.5 lam ||W||^2`` as
weight decay ``wd = lam``.

One step. With ``r = W^T h - y`` ``[K]`` the per-sample gradient is ``g = h r^T`` and the ``sgd``
step ``U = -lr (h r^T + lam W)``. ``f`` is linear in ``W``, so the change at ``x'`` is exactly
``U^T h' = -lr [ r (h . h') + lam W^T h' ]`` for every ``lr``, and the first-order form (the
Jacobian-vector product) is the same expression. Hence, ``lr`` cancelling (up to ``eps``),
``S(x, x') = ||r (h . h') + lam W^T h'|| / ||r (h . h) + lam W^T h||``.

Flow. With the feature matrix ``H`` ``[N, p]`` of the training set, ``grad R(W) = M W - B``,
``M = H^T H / N + lam I`` (symmetric, positive definite for ``lam > 0``), ``B = H^T Y / N``; the
linear ODE ``dW/dt = -theta^2 (M W - B)`` solves to
``W(t) = expm(-theta^2 t M) (W0 - M^-1 B) + M^-1 B``.
"""

from __future__ import annotations

from typing import Self

import numpy as np
from scipy.linalg import expm
from torch import nn

from analyses.theory.base import TheoryModel


class RidgeFeatures(TheoryModel):
    """``f(x) = W^T relu(V x)``; ``V`` ``[p, n]`` the fixed features, ``W`` ``[p, K]`` the weights."""

    factory = "random_features"
    param = "W"

    def __init__(self, V: np.ndarray):
        self.V = np.asarray(V, dtype=np.float64)

    @classmethod
    def from_model(cls, model: nn.Module) -> Self:
        return cls(model.get_buffer("V").double().numpy())

    def features(self, x: np.ndarray) -> np.ndarray:
        """``h = relu(V x)``: ``[N, n] -> [N, p]``."""
        return np.maximum(x @ self.V.T, 0.0)

    def forward(self, w: np.ndarray, x: np.ndarray) -> np.ndarray:
        return self.features(x) @ w

    def exact_change(self, w, x, y, lr, wd=0.0):
        h = self.features(x)  # [P, p]
        r = h @ w - y  # [P, K]
        return -lr * (r[:, None, :] * (h @ h.T)[:, :, None] + wd * (h @ w)[None, :, :])

    def linear_change(self, w, x, y, lr, wd=0.0):
        """The same as :meth:`exact_change`: ``f`` is linear in ``W``."""
        return self.exact_change(w, x, y, lr, wd)

    def normal_equations(self, x: np.ndarray, y: np.ndarray, wd: float) -> tuple[np.ndarray, np.ndarray]:
        """``M = H^T H / N + wd I`` ``[p, p]`` and ``B = H^T Y / N`` ``[p, K]``."""
        h = self.features(x)
        return h.T @ h / len(h) + wd * np.eye(h.shape[1]), h.T @ y / len(h)

    def grad(self, w, x, y, wd=0.0):
        M, B = self.normal_equations(x, y, wd)
        return M @ w - B

    def flow(self, w0, x, y, times, wd=0.0, theta=1.0):
        """The closed form ``W(t) = expm(-theta^2 t M) (W0 - M^-1 B) + M^-1 B`` -> ``[T, p, K]``."""
        M, B = self.normal_equations(x, y, wd)
        w_star = np.linalg.solve(M, B)
        return np.stack([expm(-(theta**2) * t * M) @ (w0 - w_star) + w_star for t in np.asarray(times)])
