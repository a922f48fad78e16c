"""LookSAM (Liu et al., CVPR 2022): SAM's second pass only every ``k`` steps, its effect reused in between.

On steps ``t % k == 0`` a SAM step runs, and the component of the adversarial gradient orthogonal to the
pass-1 gradient is kept::

    e = rho * g / (||g|| + eps);   g_s = grad L(w + e)                        descent gradient = g_s
    g_v = g_s - (<g_s, g> / (||g||^2 + 1e-12)) * g

On the other steps there is one pass only, and the descent gradient is::

    g + alpha * (||g|| / (||g_v|| + 1e-12)) * g_v

Global vectors; norms, inner products and ``g_v`` in at least fp32 (``promote_types(dtype, float32)``: fp32 for
fp16 / bf16 / fp32 parameters, fp64 for fp64 ones). Defaults ``rho = 0.05``, ``k = 5``, ``alpha = 0.7``. State:
``g_v`` (one parameter-sized buffer in that dtype, checkpointed by parameter name; loaded back in that dtype).
Under DDP with a local pass 1, ``g`` differs per rank while ``g_v`` enters later descents, so on SAM steps ``g`` is
summed over ranks first (the projection is invariant to the scale of ``g``): one extra all-reduce every ``k`` steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_sam import validation as check
from lightning_sam.tensor_ops import widen, widened_dtype
from lightning_sam.variants.base import StepTensors, Variant

TINY = 1e-12


class LookSAM(Variant, name="looksam"):
    """LookSAM; see the module docstring.

    Args:
        rho: SAM radius on the ``k``-th steps (default 0.05).
        k: a SAM step every ``k`` optimizer steps (default 5).
        alpha: weight of the reused ``g_v`` on the other steps (default 0.7, >= 0).
    """

    scratch_free = True

    def __init__(self, rho: float | None = None, k: int = 5, alpha: float = 0.7) -> None:
        super().__init__(rho)
        self.k = check.integer("looksam", "k", k, 1)
        self.alpha = check.real("looksam", "alpha", alpha, ">= 0")
        self._names: list[str] = []
        self._params: list[Tensor] = []
        self._gv: dict[str, Tensor] = {}  # g on a SAM step until pass 2, then g_v
        self._have_gv = False

    def bind(self, names: list[str], params: list[Tensor]) -> None:
        self._names, self._params = list(names), list(params)

    def _buffers(self, names: list[str]) -> list[Tensor]:
        for name, p in zip(self._names, self._params):
            if name not in self._gv:
                self._gv[name] = torch.zeros(p.shape, dtype=widened_dtype(p.dtype), device=p.device)
        return [self._gv[name] for name in names]

    def needs_second_pass(self, step_index: int) -> bool:
        return step_index % self.k == 0

    def direction_(self, step: StepTensors) -> Tensor:
        buffers = self._buffers(step.names)
        torch._foreach_copy_(buffers, step.grads)  # keep g for the projection after pass 2
        return step.norm(step.grads)

    def descent_(self, step: StepTensors) -> None:
        g = self._buffers(step.names)
        self.sum_tensors_over_ranks_(g)  # g_v must agree on every rank; the projection ignores the sum's scale
        g_s = [widen(x) for x in step.grads]  # no copy for fp32 / fp64 gradients
        dot = step.dot(g_s, g)
        norm_sq = step.norm(g) ** 2
        torch._foreach_mul_(g, -dot / (norm_sq + TINY))
        torch._foreach_add_(g, g_s)  # g_v = g_s - (<g_s, g> / ||g||^2) g
        self._have_gv = True

    def plain_step_(self, step: StepTensors) -> None:
        if not self._have_gv:
            return  # no SAM step yet (e.g. resumed without state): a plain step
        g_v = self._buffers(step.names)
        coefficient = self.alpha * step.norm(step.grads) / (step.norm(g_v) + TINY)
        if all(g.dtype == v.dtype for g, v in zip(step.grads, g_v)):  # fp32 / fp64: in place, no allocation
            torch._foreach_addcmul_(step.grads, g_v, [coefficient] * len(g_v))
        else:
            for grad, v in zip(step.grads, g_v):
                grad.add_((coefficient * v).to(grad.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"have_gv": self._have_gv, "g_v": {name: t.detach().cpu() for name, t in self._gv.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._have_gv = bool(state.get("have_gv", False))
        by_name = dict(zip(self._names, self._params))
        self._gv = {
            name: t.to(device=by_name[name].device, dtype=widened_dtype(by_name[name].dtype), copy=True)
            for name, t in state.get("g_v", {}).items()
            if name in by_name
        }

    def extra_repr(self) -> str:
        return f"rho={self.rho}, k={self.k}, alpha={self.alpha}"
