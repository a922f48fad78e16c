"""SAM (Foret et al., 2021) and ASAM (Kwon et al., 2021).

SAM::

    e = rho * g / (||g|| + eps)                    descent gradient = g_adv

ASAM, with the element-wise scale ``T = |w| + eta`` on every trained tensor (weights and biases alike)::

    e = rho * T^2 * g / (||T * g|| + eps)          descent gradient = g_adv

Norms are one global L2 norm over all trained parameters, in fp32 (fp64 for fp64 parameters); ``eps = 1e-12``;
``T`` uses ``w`` before the ascent. Defaults: SAM ``rho = 0.05``; ASAM ``rho = 0.5``, ``eta = 0.01``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sam import validation as check
from lightning_sam.tensor_ops import flat_like
from lightning_sam.variants.base import StepTensors, Variant


class SAM(Variant, name="sam"):
    """Sharpness-Aware Minimization: ``e = rho * g / (||g|| + eps)``. No state."""

    scratch_free = True

    def __init__(self, rho: float | None = None) -> None:
        super().__init__(rho)

    def direction_(self, step: StepTensors) -> Tensor:
        return step.norm(step.grads)


class ASAM(Variant, name="asam", default_rho=0.5):
    """Adaptive SAM: ``e = rho * T^2 * g / (||T * g|| + eps)`` with ``T = |w| + eta``. No state.

    ``T`` is built in a scratch buffer of the parameters' size, allocated once, when the engine swaps ``w + e`` in
    (it then keeps no saved copy); otherwise (sharded parameters, or when the engine copies) in the weights
    themselves, which the engine's saved copy then puts back bit-exactly. Either way the same arithmetic.

    Args:
        rho: neighbourhood radius in the scaled space (default 0.5).
        eta: offset added to ``|w|`` so that zero weights are still perturbed (default 0.01, >= 0).
    """

    scratch_free = True  # with step.swap, T lives in its own buffer

    def __init__(self, rho: float | None = None, eta: float = 0.01) -> None:
        super().__init__(rho)
        self.eta = check.real("asam", "eta", eta, ">= 0", " (default 0.01)")
        self._scratch: dict[str, Tensor] = {}  # name -> T's buffer (a view of one flat buffer per device and dtype)
        self._bound: list[tuple[str, Tensor]] = []
        self._cache: tuple[list[str] | None, list[Tensor]] = (None, [])

    def bind(self, names: list[str], params: list[Tensor]) -> None:
        self._bound = list(zip(names, params))

    def direction_(self, step: StepTensors) -> Tensor:
        if step.ascent:
            raise RuntimeError("asam is a single-step rule: T = |w| + eta uses w before the (only) ascent")
        params, grads = step.params, step.grads
        with torch.no_grad():
            scale = self._scratch_of(step.names) if step.swap else params  # params: restored from step.saved below
            if step.swap:
                torch._foreach_copy_(scale, params)
            torch._foreach_abs_(scale)
            torch._foreach_add_(scale, self.eta)
            torch._foreach_mul_(grads, scale)  # T * g
            denominator = step.norm(grads)
            torch._foreach_mul_(grads, scale)  # T^2 * g
            if not step.swap:
                torch._foreach_copy_(params, step.saved)
        return denominator

    def _scratch_of(self, names: list[str]) -> list[Tensor]:
        """T's buffers for the step's tensors, in step order (allocated on first use, one flat buffer per device and
        dtype; the list is rebuilt only when the step's parameter list changes)."""
        if self._cache[0] is not names:
            if not self._scratch:
                self._scratch = dict(zip([n for n, _ in self._bound], flat_like([p for _, p in self._bound])))
            self._cache = (names, [self._scratch[name] for name in names])
        return self._cache[1]

    def extra_repr(self) -> str:
        return f"rho={self.rho}, eta={self.eta}"
