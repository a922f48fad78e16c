"""F-SAM, Friendly SAM (Li et al., CVPR 2024).

Remove the estimate of the full-batch gradient (an EMA ``m`` of past minibatch gradients) from the ascent
direction and keep the batch-specific noise. Per element, per trained tensor, at ascent ``t = 1, 2, ...``::

    t == 1:  m = g;            d = g                          (the first step is plain SAM)
    t > 1:   d = g - sigma * m;  m = lmbda * m + (1 - lmbda) * g   (d uses m before the update; m averages raw g)
    e = rho * d / (||d|| + eps)                               descent gradient = g_adv

``adaptive=True`` scales ``d`` as ASAM does with ``eta = 0``: ``e = rho * w^2 * d / (||w * d|| + eps)``.
Defaults: ``rho = 0.05``, ``sigma = 1.0``, ``lmbda = 0.9``, ``adaptive = False``.

State: ``m`` per trained tensor, keyed by parameter name, and the number of ascents done. ``m`` is kept in at least
fp32: ``promote_types(dtype, float32)`` of the gradient, i.e. fp32 for fp16 / bf16 / fp32 parameters and fp64 for
fp64 ones (a loaded ``m`` too, whatever dtype it was stored in). ``m`` is only updated when the engine asks for a
direction (a step skipped because pass 1 was not finite leaves it untouched). A tensor seen for the first time
after step 1 (e.g. unfrozen) starts with ``m = g``, ``d = g`` for that tensor; a tensor that has no gradient in a
step keeps its ``m`` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_sam import validation as check
from lightning_sam.tensor_ops import widened_dtype
from lightning_sam.variants.base import StepTensors, Variant


class FSAM(Variant, name="fsam"):
    """Friendly SAM: ascend along ``d = g - sigma * m``, ``m`` an EMA of the pass-1 gradients.

    Args:
        rho: neighbourhood radius (default 0.05; the official CIFAR-100 recipe uses 0.2).
        sigma: how much of the EMA (the full-gradient estimate) is removed from ``g`` (default 1.0, >= 0).
        lmbda: EMA decay, in ``[0, 1)`` (default 0.9).
        adaptive: ASAM's scaling with ``eta = 0`` on ``d``: ``e = rho * w^2 * d / (||w * d|| + eps)``.

    Memory: one buffer the size of the trained parameters (``m``; fp32, fp64 for fp64 parameters), allocated once
    per tensor when it first takes part. The per-step work allocates nothing parameter-sized. For fp32 / fp64
    parameters ``m`` is updated from ``d`` (``m = (lmbda + (1 - lmbda) sigma) m + (1 - lmbda) d``, the same EMA) and
    the weights are never written, so the engine needs no saved copy (it swaps ``w + e`` in); for fp16 / bf16 ones
    ``d`` would be rounded, so the weights hold the raw ``g`` meanwhile (copied back from the engine's saved copy
    bit-exactly).
    """

    per_rank_state = True  # under a local ascent each rank averages its own pass-1 gradient

    def __init__(
        self, rho: float | None = None, sigma: float = 1.0, lmbda: float = 0.9, adaptive: bool = False
    ) -> None:
        super().__init__(rho)
        self.sigma = check.real("fsam", "sigma", sigma, ">= 0", " (default 1.0)")
        self.lmbda = check.real("fsam", "lmbda", lmbda, "in [0, 1)", " (default 0.9)")
        self.adaptive = check.flag("fsam", "adaptive", adaptive)
        self.steps = 0  # ascents done (t - 1 during an ascent)
        self._ema: dict[str, Tensor] = {}  # name -> m (>= fp32, on the parameter's device)
        self._loaded: dict[str, Tensor] = {}  # name -> m from load_state_dict, not yet moved to its device
        self._cache_names: list[str] | None = None
        self._cache_ready: list[int] = []
        self._cache_ema: list[Tensor] = []
        self._cache_lmbda: Tensor | float = self.lmbda
        self._cache_decay: Tensor | float | None = None

    def bind(self, names: list[str], params: list[Tensor]) -> None:
        # fp32 / fp64 gradients: m is updated from d (no scratch), so the engine may swap instead of copying
        self.scratch_free = all(widened_dtype(p.dtype) == p.dtype for p in params)

    # ----------------------------------------------------------------- the rule
    def direction_(self, step: StepTensors) -> Tensor:
        if getattr(step, "ascent", 0):
            raise RuntimeError("fsam is a single-step rule: the EMA takes one pass-1 gradient per step")
        names, params, grads, saved = step.names, step.params, step.grads, step.saved
        if len(saved) != len(params):
            raise RuntimeError("fsam needs the engine's saved copy of every weight (registered without sparse=True)")
        with torch.no_grad():
            if step.names is not self._cache_names:
                self._rebuild_cache(names, grads)
            ready, ema = self._cache_ready, self._cache_ema
            if ready:
                all_ready = len(ready) == len(grads)
                g = grads if all_ready else [grads[i] for i in ready]
                if self.scratch_free:  # fp32 / fp64 gradients: m from d, no scratch (d is exact enough)
                    torch._foreach_add_(g, ema, alpha=-self.sigma)  # d = g - sigma * m (m before the update)
                    if self._cache_decay is not None:
                        torch._foreach_mul_(ema, self._cache_decay)
                    torch._foreach_add_(ema, g, alpha=1.0 - self.lmbda)  # m = decay * m + (1 - lmbda) * d
                else:  # fp16 / bf16 gradients: m from the raw g, kept in the weights meanwhile (exact copies)
                    w = params if all_ready else [params[i] for i in ready]
                    w0 = saved if all_ready else [saved[i] for i in ready]
                    torch._foreach_copy_(w, g)
                    torch._foreach_add_(g, ema, alpha=-self.sigma)  # d = g - sigma * m (m before the update)
                    torch._foreach_mul_(ema, self._cache_lmbda)  # 0-dim tensor: CPU's foreach Scalar path is slower
                    torch._foreach_add_(ema, w, alpha=1.0 - self.lmbda)  # m = lmbda * m + (1 - lmbda) * g
                    torch._foreach_copy_(w, w0)  # the weights are w again, bit-exactly
            if len(ready) != len(grads):
                # first appearance of a tensor (all of them at t == 1): m = g, d = g
                fresh = set(ready)
                for i, name in enumerate(names):
                    if i not in fresh:
                        self._ema[name] = grads[i].detach().to(dtype=widened_dtype(grads[i].dtype), copy=True)
                self._cache_names = None  # they are ready from the next step on
            if self.adaptive:
                torch._foreach_mul_(grads, saved)  # w * d (||w * d|| = || |w| * d ||)
                denominator = step.norm(grads)
                torch._foreach_mul_(grads, saved)  # w^2 * d
            else:
                denominator = step.norm(grads)
        self.steps += 1
        return denominator

    def _rebuild_cache(self, names: list[str], grads: list[Tensor]) -> None:
        """Which of this step's tensors already have an EMA, and those EMAs in step order (on their device)."""
        ready, ema = [], []
        for i, (name, grad) in enumerate(zip(names, grads)):
            m = self._ema.get(name, self._loaded.get(name))
            if m is None:
                continue
            if m.shape != grad.shape:
                raise ValueError(
                    f"fsam: the EMA of {name!r} has shape {tuple(m.shape)} but its gradient {tuple(grad.shape)}; "
                    "was this state saved for another model?"
                )
            if name not in self._ema:  # loaded: take our own copy (>= fp32, as the gradient), on its device
                m = self._loaded.pop(name).detach().to(device=grad.device, dtype=widened_dtype(grad.dtype), copy=True)
            elif m.device != grad.device:
                m = m.to(device=grad.device)
            self._ema[name] = m
            ready.append(i)
            ema.append(m)
        self._cache_names, self._cache_ready, self._cache_ema = names, ready, ema
        uniform = ema and all(m.device == ema[0].device and m.dtype == ema[0].dtype for m in ema)
        # lmbda in the EMA's own dtype (fp64 EMAs must not get an fp32-rounded lmbda); a Python number otherwise
        lmbda = torch.tensor(self.lmbda, dtype=ema[0].dtype, device=ema[0].device) if uniform else self.lmbda
        self._cache_lmbda: Tensor | float = lmbda
        # the EMA's decay when it is updated from d = g - sigma * m: lmbda + (1 - lmbda) * sigma (None: exactly 1)
        decay = 1.0 if self.sigma == 1.0 else self.lmbda + (1.0 - self.lmbda) * self.sigma
        self._cache_decay: Tensor | float | None = None
        if decay != 1.0:
            self._cache_decay = torch.tensor(decay, dtype=ema[0].dtype, device=ema[0].device) if uniform else decay

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """``{"step": ascents done, "ema": {name: m}}``; ``m`` are the live tensors (no copy), as
        ``torch.optim.Optimizer.state_dict`` does: clone them to keep a snapshot."""
        ema = dict(self._loaded)
        ema.update(self._ema)
        return {"step": self.steps, "ema": ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Each tensor is copied to its parameter's device, in
        ``promote_types(dtype, float32)`` of the gradient (fp64 for fp64 parameters), when first used."""
        if not state:
            self.steps, self._ema, self._loaded, self._cache_names = 0, {}, {}, None
            return
        unknown = sorted(set(state) - {"step", "ema"})
        if unknown or "ema" not in state or "step" not in state:
            raise ValueError(f"fsam: expected state keys ['ema', 'step'], got {sorted(state)}")
        ema = state["ema"]
        if not isinstance(ema, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in ema.items()):
            raise ValueError("fsam: state['ema'] must map parameter names to tensors")
        # Kept as given; each is copied to its parameter's device (>= fp32) when the parameter first takes part, so
        # the caller's tensors are never updated in place and no second copy is made on the wrong device.
        self._loaded = dict(ema)
        self._ema = {}
        self.steps = int(state["step"])
        self._cache_names = None

    def extra_repr(self) -> str:
        return f"rho={self.rho}, sigma={self.sigma}, lmbda={self.lmbda}, adaptive={self.adaptive}"
