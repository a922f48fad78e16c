"""XSAM, explicit SAM (Chen & Zhou, ICLR 2026): descend along an explicit estimate of the direction to the
neighbourhood maximum, in the plane of the ascent displacement and the ascent-point gradient.

Per step, with ``k = steps`` ascent passes (SAM's ``g_k`` approximates the direction to the maximum)::

    w0 = w                                                   (the engine's saved copy)
    for i in 0..k-1:  g_i = grad L(w);  w = w + (rho/k) * g_i / (||g_i|| + eps)
    g_k = grad L(w)
    v0 = (w - w0) / (||w - w0|| + eps)                       (k = 1: the direction of g_0)
    v1 = g_k / (||g_k|| + eps);   theta = arccos(clamp(<v0, v1>, -1, 1))
    v(a) = [sin((1-a) theta) v0 + sin(a theta) v1] / sin(theta)      (sin(theta) < 1e-8: v = (v0 + v1) / 2)
    descent gradient = ||g_k|| * v(alpha)                    (replaces g_k; then w = w0 and the optimizer steps)

``alpha = 1`` gives SAM's ``g_k`` exactly, ``alpha = 0`` the ascent direction. ``alpha`` is refreshed by a search
on the first step and every ``alpha_every`` steps (the callback: the first batch of each epoch): for ``a`` in
``0, alpha_step, ..., alpha_max`` the loss at ``w0 + rho_max * v(a)`` is evaluated (forward only, same batch, no
side effects; averaged over DDP ranks) and the first argmax is kept. Between refreshes ``v0``, ``v1`` and
``theta`` come from each step's fresh gradients; only ``alpha`` is reused.

Under DDP with a local ascent ``w - w0`` differs per rank; it enters the descent, so it is summed over ranks
first (one parameter-sized all-reduce per step; ``sync_ascent=True`` makes it redundant but harmless).
Norms, ``<v0, v1>``, ``theta`` and the probe losses are computed in at least fp32 (fp64 for fp64 parameters).
Defaults: ``rho = 0.15``, ``rho_max = 2 rho``, ``steps = 1``, ``alpha_max = 2.0``, ``alpha_step = 0.1``, initial
``alpha = 1.0``. Source: the authors' code (github.com/Cccjl219/XSAM, ``utils/xsam.py``), with the arccos clamped.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_sam import validation as check
from lightning_sam.tensor_ops import EPS, widen
from lightning_sam.variants.base import RunLength, StepTensors, Variant


class XSAM(Variant, name="xsam", default_rho=0.15):
    """Explicit SAM; see the module docstring for the rule.

    Args:
        rho: ascent radius (default 0.15).
        steps: ascent passes ``k`` (default 1; ``k + 1`` forward/backward passes per step).
        rho_max: radius of the alpha-search probes (default ``2 * rho``).
        alpha: initial interpolation factor (default 1.0, i.e. SAM until the first search).
        alpha_max: the largest alpha of the search grid (default 2.0).
        alpha_step: the grid spacing: ``0, alpha_step, ..., alpha_max`` (default 0.1).
        alpha_every: steps between searches (``None``: only at step 0 in ``SAMEngine``; the callback searches on
            the first batch of each epoch). ``0`` disables the search (``alpha`` stays fixed).
    """

    scratch_free = True  # direction_ reads the gradients only; descent_ builds v0 in the perturbed weights

    def __init__(
        self,
        rho: float | None = None,
        steps: int = 1,
        rho_max: float | None = None,
        alpha: float = 1.0,
        alpha_max: float = 2.0,
        alpha_step: float = 0.1,
        alpha_every: int | None = None,
    ) -> None:
        super().__init__(rho)
        self.steps = check.integer("xsam", "steps", steps, 1)
        self.rho_max = check.real("xsam", "rho_max", 2 * self.rho if rho_max is None else rho_max)
        self.alpha_step = check.real("xsam", "alpha_step", alpha_step)
        self.alpha_max = check.real("xsam", "alpha_max", alpha_max)
        self.alpha = check.real("xsam", "alpha", alpha, "any")
        if alpha_every is not None:
            check.integer("xsam", "alpha_every", alpha_every, 0, " (or None)")
        self.alpha_every = alpha_every
        self.grid = [i * self.alpha_step for i in range(math.floor(self.alpha_max / self.alpha_step + 1e-9) + 1)]
        self.searches = 0
        self._next_search = 0
        self.last_probe_losses: Tensor | None = None

    @classmethod
    def run_defaults(cls, options: dict[str, Any], run: RunLength) -> dict[str, Any]:
        if options.get("alpha_every") is not None:
            return {}
        what = "its alpha search runs once per epoch by default"
        return {"alpha_every": max(1, run.epoch("xsam", what, "alpha_every"))}

    @property
    def ascent_steps(self) -> int:
        """Ascent passes per step (``k``)."""
        return self.steps

    # ------------------------------------------------------------------ ascent
    def direction_(self, step: StepTensors) -> Tensor:
        # e = (rho / k) * g_i / (||g_i|| + eps): with the engine's e = rho * u / (n + eps), n = k ||g|| + (k-1) eps
        return self.steps * step.norm(step.grads) + (self.steps - 1) * EPS

    # ------------------------------------------------------------------ descent
    def search_due(self, step_index: int) -> bool:
        """A search is due at step 0 and every ``alpha_every`` steps; one that falls on a step without pass 2
        (``interval > 1``) runs at the next step that has one."""
        if self.alpha_every == 0:
            return False
        if self.alpha_every is None:
            return self.searches == 0
        return step_index >= self._next_search

    @staticmethod
    def _weights(alpha: float, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Coefficients of v0 and v1 in v(alpha) (0-dim tensors in ``theta``'s dtype, no host sync)."""
        sin_theta = torch.sin(theta)
        degenerate = sin_theta < 1e-8
        safe = torch.where(degenerate, torch.ones_like(sin_theta), sin_theta)
        c0 = torch.where(degenerate, torch.full_like(theta, 0.5), torch.sin((1 - alpha) * theta) / safe)
        c1 = torch.where(degenerate, torch.full_like(theta, 0.5), torch.sin(alpha * theta) / safe)
        return c0, c1

    def descent_(self, step: StepTensors) -> None:
        search = self.search_due(step.step) and step.evaluate is not None
        if self.alpha == 1.0 and not search:
            return  # v(1) = v1, so the descent gradient is g_k itself: SAM's step, exactly
        params, grads, saved = step.params, step.grads, step.saved
        # v0 in place in the weights: w <- w - w0 (the displacement), summed over ranks (local ascents differ)
        torch._foreach_sub_(params, saved)
        self.sum_tensors_over_ranks_(params)  # local ascents differ per rank; v0 enters the descent
        raw_norm = step.norm(params)
        displacement_norm = raw_norm + EPS
        torch._foreach_div_(params, displacement_norm)  # v0
        grad_norm = step.norm(grads)
        torch._foreach_div_(grads, grad_norm + EPS)  # v1
        cosine = inner_product_(step, params, grads, raw_norm / displacement_norm, grad_norm / (grad_norm + EPS))
        theta = torch.arccos(torch.clamp(cosine, -1.0, 1.0))
        if search:
            self._search(step, theta)
        c0, c1 = self._weights(self.alpha, theta)
        # descent gradient = ||g_k|| * (c0 v0 + c1 v1), built in place (the weights hold v0 until the engine
        # restores w = w0 right after this hook)
        torch._foreach_mul_(grads, c1 * grad_norm)
        torch._foreach_mul_(params, c0 * grad_norm)
        torch._foreach_add_(grads, params)

    def _search(self, step: StepTensors, theta: Tensor) -> None:
        """Probe the loss at w0 + rho_max * v(a) for every a of the grid; keep the first argmax as alpha."""
        assert step.evaluate is not None
        v0 = [p.detach().clone() for p in step.params]  # the one transient parameter-sized buffer of a refresh
        v1 = step.grads
        if step.evaluate_clobbers_grads:
            v1 = [g.detach().clone() for g in step.grads]
        losses = []
        angle = float(theta)  # one host sync for the whole search (the argmax below needs another)
        for a in self.grid:
            c0, c1 = (c * self.rho_max for c in _weights_of(a, angle))
            torch._foreach_copy_(step.params, step.saved)
            torch._foreach_add_(step.params, v0, alpha=c0)
            torch._foreach_add_(step.params, v1, alpha=c1)
            # a training closure (clobbers the grads) needs autograd; a forward-only probe does not
            with torch.enable_grad() if step.evaluate_clobbers_grads else torch.no_grad():
                losses.append(widen(step.evaluate().detach()).reshape(()))  # fp64 for an fp64 loss
        probe = torch.stack(losses)
        self.all_reduce_sum_(probe)  # the same argmax on every rank
        self.last_probe_losses = probe
        finite = torch.where(torch.isfinite(probe), probe, torch.full_like(probe, -math.inf))
        best = int(torch.argmax(finite).item())  # the first argmax among finite losses
        if math.isfinite(float(finite[best])):  # all probes non-finite (an overflowing step): keep alpha
            self.alpha = self.grid[best]
        self.searches += 1
        if self.alpha_every:
            self._next_search = (step.step // self.alpha_every + 1) * self.alpha_every
        torch._foreach_copy_(step.params, v0)
        if step.evaluate_clobbers_grads:
            torch._foreach_copy_(step.grads, v1)

    # ------------------------------------------------------------------ state
    def metrics(self) -> dict[str, Tensor]:
        return {"sam/xsam_alpha": torch.tensor(self.alpha)}

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "searches": self.searches, "next_search": self._next_search}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = float(state["alpha"])
        self.searches = int(state.get("searches", 0))
        self._next_search = int(state.get("next_search", 0))

    def extra_repr(self) -> str:
        return f"rho={self.rho}, steps={self.steps}, rho_max={self.rho_max}, alpha={self.alpha}"


def _weights_of(alpha: float, theta: float) -> tuple[float, float]:
    """Coefficients of v0 and v1 in v(alpha) for a Python-float angle (the search's probes)."""
    sin_theta = math.sin(theta)
    if sin_theta < 1e-8:
        return 0.5, 0.5
    return math.sin((1 - alpha) * theta) / sin_theta, math.sin(alpha * theta) / sin_theta


def inner_product_(step: StepTensors, a: list[Tensor], b: list[Tensor], norm_a: Tensor, norm_b: Tensor) -> Tensor:
    """``<a, b>`` from the norms, with foreach passes only (no Python loop over tensors, nothing allocated):
    ``(||a||^2 + ||b||^2 - ||a - b||^2) / 2``. ``a`` is turned into ``a - b`` and back into ``a`` (up to one rounding
    per element); the norm is ``step.norm`` (accumulated in at least fp32, global over shards)."""
    torch._foreach_sub_(a, b)
    chord = step.norm(a)
    torch._foreach_add_(a, b)
    return (norm_a * norm_a + norm_b * norm_b - chord * chord) / 2
