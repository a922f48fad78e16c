"""Gradient clipping on the descent gradient, for SAMMixin (Lightning forbids ``gradient_clip_val`` under
manual optimization). Matches ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` on the unscaled
gradients, and works on gradients that are still multiplied by a GradScaler's scale (the bound is scaled
instead, so no host sync and no extra unscale is needed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_sam import validation as check
from lightning_sam.tensor_ops import accumulation_dtype, global_norm

CLIP_ALGORITHMS = ("norm", "value")


def validate_clipping(value: float | None, algorithm: str) -> None:
    """Raise for a negative/non-finite clip value or an unknown algorithm."""
    check.choice("", "gradient_clip_algorithm", algorithm, CLIP_ALGORITHMS)
    if value is not None:
        check.real("", "gradient_clip_val", value, "> 0", " (or None)")


@torch.no_grad()
def clip_gradients_(
    grads: Sequence[Tensor],
    value: float,
    algorithm: str = "norm",
    scale: Tensor | None = None,
    norm: Callable[[Sequence[Tensor]], Tensor] = global_norm,
) -> None:
    """Clip ``grads`` in place by global norm (``algorithm="norm"``) or element value (``"value"``).

    ``scale``: the loss scale the gradients are still multiplied by (16-mixed before unscaling), or None.
    Norm clipping multiplies by ``min(1, value / (||g|| + 1e-6))`` as ``clip_grad_norm_`` does. The norm and the
    bounds are in fp32, fp64 when a gradient is fp64 (a bound such as 0.1 is not rounded to fp32 for fp64 gradients).
    ``norm``: the global norm of ``grads`` (sharded gradients: this rank's shards, reduced over every rank).
    """
    grads = list(grads)
    if not grads:
        return
    if algorithm == "norm":
        total = norm(grads)  # fp32, or fp64 for fp64 gradients: the bound is formed in the same dtype
        limit = torch.as_tensor(float(value), dtype=total.dtype, device=total.device)
        epsilon = torch.as_tensor(1e-6, dtype=total.dtype, device=total.device)
        if scale is not None:
            limit = limit * scale.to(total.device)
            epsilon = epsilon * scale.to(total.device)
        coefficient = torch.clamp(limit / (total + epsilon), max=1.0)
        torch._foreach_mul_(grads, coefficient)
    else:
        bound = torch.as_tensor(float(value), dtype=accumulation_dtype(grads), device=grads[0].device)
        if scale is not None:
            bound = bound * scale.to(bound.device)
        torch._foreach_clamp_max_(grads, [bound.to(g.device, g.dtype) for g in grads])
        torch._foreach_clamp_min_(grads, [(-bound).to(g.device, g.dtype) for g in grads])
