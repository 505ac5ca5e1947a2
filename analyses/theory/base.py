"""What the closed-form families of SPEC §6 share: the virtual step, S_rel from output changes,
the training objective and its gradient flow.

Notation (every family): ``w`` the trained weights (a numpy float64 array, the shape of the torch
parameter named :attr:`TheoryModel.param`), ``x`` ``[P, n]`` inputs, ``y`` ``[P, C]`` targets,
``C`` outputs. The per-sample loss is ``half_sse``, ``l = 0.5 ||f(x; w) - y||^2``, with per-sample
gradient ``g_i``. The virtual step is replay's ``sgd`` rule (SPEC §2),
``U_i = -lr (g_i + wd w)``, and

- ``D[i, j] = f(x_j; w + U_i) - f(x_j; w)`` ``[P, P, C]``: the exact output change
  (:meth:`TheoryModel.exact_change`, a closed form per family, free of the cancellation that
  computing the difference of two forwards suffers),
- ``L[i, j] = J(x_j) . U_i`` ``[P, P, C]``: its first-order form (:meth:`TheoryModel.linear_change`),
- ``S[i, j] = ||D[i, j]|| / (||D[i, i]|| + eps)`` (:func:`s_rel`, SPEC §3 ``orig`` on raw outputs;
  ``linear`` is the same ratio of ``L``).

Training minimises ``R(w) = mean_n l(x_n, y_n) + 0.5 wd ||w||^2``: gradient descent with step
``lr`` is ``torch.optim.SGD(lr, weight_decay=wd)`` on the batch mean of ``half_sse``. Gradient flow
is ``dw/dt = -theta^2 grad R(w)``; ``k`` steps of gradient descent approximate the flow at time
``t = k lr / theta^2`` with an error of order ``lr`` (:meth:`TheoryModel.flow`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Self

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import nn

from recorder.losses import batch_loss

EPS = 1e-8  # SPEC §3


def s_rel(D: np.ndarray, eps: float = EPS, ord: int = 2) -> np.ndarray:
    """``S[..., i, j] = ||D[..., i, j, :]|| / (||D[..., i, i, :]|| + eps)`` in the ``ord``-norm over outputs:
    ``[..., P, P, C] -> [..., P, P]``."""
    norms = np.linalg.norm(D, ord=ord, axis=-1)
    return norms / (np.diagonal(norms, axis1=-2, axis2=-1)[..., :, None] + eps)


class TheoryModel(ABC):
    """One family of SPEC §6: its model's fixed parts (features, degree), not its weights."""

    factory: ClassVar[str]  # the model factory registered in recorder.models
    param: ClassVar[str]  # the name of the torch module's single trained parameter

    @classmethod
    @abstractmethod
    def from_model(cls, model: nn.Module) -> Self:
        """The family's fixed parts, read from a module built by :attr:`factory`."""

    @classmethod
    def weights(cls, model: nn.Module) -> np.ndarray:
        """The trained weights ``w`` of ``model`` as float64."""
        return model.get_parameter(cls.param).detach().to(torch.float64).numpy()

    @abstractmethod
    def forward(self, w: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Outputs ``f(x; w)``: ``x [N, n] -> [N, C]``."""

    @abstractmethod
    def exact_change(
        self, w: np.ndarray, x: np.ndarray, y: np.ndarray, lr: float, wd: float = 0.0
    ) -> np.ndarray:
        """``D[i, j] = f(x_j; w + U_i) - f(x_j; w)`` ``[P, P, C]`` for the samples ``x [P, n]``, ``y [P, C]``."""

    @abstractmethod
    def linear_change(
        self, w: np.ndarray, x: np.ndarray, y: np.ndarray, lr: float, wd: float = 0.0
    ) -> np.ndarray:
        """``L[i, j] = J(x_j) . U_i`` ``[P, P, C]`` for the samples ``x [P, n]``, ``y [P, C]``."""

    @abstractmethod
    def grad(self, w: np.ndarray, x: np.ndarray, y: np.ndarray, wd: float = 0.0) -> np.ndarray:
        """``grad R(w)`` (shaped like ``w``) over the training set ``x [N, n]``, ``y [N, C]``."""

    def loss(self, w: np.ndarray, x: np.ndarray, y: np.ndarray, wd: float = 0.0) -> float:
        """The objective ``R(w)``: the mean ``half_sse`` over ``x [N, n]``, ``y [N, C]`` plus ``0.5 wd ||w||^2``."""
        data = batch_loss("half_sse", torch.from_numpy(self.forward(w, x)), torch.from_numpy(np.asarray(y)))
        return float(data) + 0.5 * wd * float(np.sum(w * w))

    def flow(
        self,
        w0: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        times: np.ndarray,
        wd: float = 0.0,
        theta: float = 1.0,
    ) -> np.ndarray:
        """Gradient flow ``dw/dt = -theta^2 grad R(w)`` from ``w0`` at ``times [T]`` (increasing,
        from 0 up) -> ``[T, *w0.shape]``, integrated numerically (LSODA, rtol 1e-10)."""
        times = np.asarray(times, dtype=np.float64)
        shape = np.shape(w0)

        def rhs(_t: float, v: np.ndarray) -> np.ndarray:
            return -(theta**2) * self.grad(v.reshape(shape), x, y, wd).ravel()

        sol = solve_ivp(
            rhs,
            (0.0, float(times[-1])),
            np.asarray(w0, dtype=np.float64).ravel(),
            method="LSODA",
            t_eval=times,
            rtol=1e-10,
            atol=1e-12,
        )
        if not sol.success:
            raise RuntimeError(f"gradient flow integration failed: {sol.message}")
        return sol.y.T.reshape((len(times), *shape))
