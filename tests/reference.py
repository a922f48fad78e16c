"""Plain, loop-per-parameter reference implementations written from ../shared/ALGORITHMS.md.

Deliberately simple and independent of ``lightning_sam``'s engine: the test suite's oracle. Every function
works on Python lists of tensors, one parameter at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

EPS = 1e-12


def l2_norm(tensors: Iterable[Tensor]) -> Tensor:
    """sqrt(sum of squares) over all tensors, accumulated in fp32."""
    total = torch.zeros((), dtype=torch.float32)
    for t in tensors:
        total = total + (t.detach().float() ** 2).sum()
    return total.sqrt()


def sam_perturbation(params: list[Tensor], grads: list[Tensor], rho: float) -> list[Tensor]:
    """SAM: e = rho * g / (||g|| + eps)."""
    norm = l2_norm(grads)
    return [rho * g / (norm + EPS) for g in grads]


def asam_perturbation(params: list[Tensor], grads: list[Tensor], rho: float, eta: float = 0.01) -> list[Tensor]:
    """ASAM: T = |w| + eta, e = rho * T^2 g / (||T g|| + eps)."""
    scales = [p.detach().abs() + eta for p in params]
    norm = l2_norm([t * g for t, g in zip(scales, grads)])
    return [rho * t * t * g / (norm + EPS) for t, g in zip(scales, grads)]


PERTURBATIONS: dict[str, Callable[..., list[Tensor]]] = {"sam": sam_perturbation, "asam": asam_perturbation}


def reference_sam_step(
    model: nn.Module,
    loss_of: Callable[[nn.Module], Tensor],
    optimizer: torch.optim.Optimizer,
    variant: str = "sam",
    rho: float = 0.05,
    **options: float,
) -> tuple[Tensor, Tensor]:
    """One SAM-family step: pass 1, perturb, pass 2, restore by copy, optimizer step. Returns (loss1, loss2)."""
    optimizer.zero_grad()
    loss1 = loss_of(model)
    loss1.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad.detach().clone() for p in params]
    originals = [p.detach().clone() for p in params]
    perturbation = PERTURBATIONS[variant](params, grads, rho, **options)
    with torch.no_grad():
        for p, e in zip(params, perturbation):
            p.add_(e)
    buffers = [b.detach().clone() for b in model.buffers()]  # BatchNorm statistics as pass 1 left them
    optimizer.zero_grad()
    loss2 = loss_of(model)
    loss2.backward()
    with torch.no_grad():
        for p, original in zip(params, originals):
            p.copy_(original)
        for b, original in zip(model.buffers(), buffers):
            b.copy_(original)
    optimizer.step()
    return loss1.detach(), loss2.detach()
