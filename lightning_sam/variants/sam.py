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
from lightning_sam.variants.base import StepTensors, Variant


class SAM(Variant, name="sam"):
    """Sharpness-Aware Minimization: ``e = rho * g / (||g|| + eps)``. No state."""

    def __init__(self, rho: float | None = None) -> None:
        super().__init__(rho)

    def direction_(self, step: StepTensors) -> Tensor:
        return step.norm(step.grads)


class ASAM(Variant, name="asam", default_rho=0.5):
    """Adaptive SAM: ``e = rho * T^2 * g / (||T * g|| + eps)`` with ``T = |w| + eta``. No state.

    Args:
        rho: neighbourhood radius in the scaled space (default 0.5).
        eta: offset added to ``|w|`` so that zero weights are still perturbed (default 0.01, >= 0).
    """

    def __init__(self, rho: float | None = None, eta: float = 0.01) -> None:
        super().__init__(rho)
        self.eta = check.real("asam", "eta", eta, ">= 0", " (default 0.01)")

    def direction_(self, step: StepTensors) -> Tensor:
        if step.ascent:
            raise RuntimeError("asam is a single-step rule: T = |w| + eta uses w before the (only) ascent")
        params, grads = step.params, step.grads
        with torch.no_grad():
            # Use the weights themselves as scratch for T (no extra buffer); at the first ascent they equal the
            # saved copy, so copying it back below restores them bit-exactly.
            torch._foreach_abs_(params)
            torch._foreach_add_(params, self.eta)
            torch._foreach_mul_(grads, params)  # T * g
            denominator = step.norm(grads)
            torch._foreach_mul_(grads, params)  # T^2 * g
            torch._foreach_copy_(params, step.saved)
        return denominator

    def extra_repr(self) -> str:
        return f"rho={self.rho}, eta={self.eta}"
