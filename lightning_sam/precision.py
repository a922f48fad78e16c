"""Loss scaling in SAM's step: one object per fit, either :class:`NoScaling` or :class:`GradScaling` (16-mixed).

The step driver (:mod:`lightning_sam.step`) asks it five questions and never touches a GradScaler itself: did pass 1
overflow (then the step runs no pass 2), unscale between the ascents of a multi-step variant, finish pass 2 (unscale
it and register its overflow), will the optimizer skip this step, and the skip flag as a tensor (no host sync, for
variants acting right before the step). Adapters also ask it for logged losses and for the scale that gradients still
carry when they clip them. Pure PyTorch: no Lightning import.

Why GradScaler needs more than ``scaler.step``: Lightning's ``MixedPrecision`` plugin unscales the gradients of *one*
backward per optimizer step (automatic optimization: before ``on_before_optimizer_step``). SAM runs a second
backward after that, whose gradients are scaled again and which GradScaler would never unscale (the first descent
step would be ``scale`` times too large), and whose overflow it would never see. So pass 2's gradients are unscaled
with GradScaler's own ``_unscale_grads_`` and its found-inf is OR-ed into
``scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]``: an overflow in either pass makes
``scaler.step`` skip the step and ``scaler.update`` lower the scale exactly once. Optimizers that unscale inside
``step`` (``_step_supports_amp_scaling``, e.g. ``Adam(fused=True)``), and manual optimization (where Lightning
unscales at ``optimizer.step()``), keep pass 2 scaled; for them pass 1's gradients are still scaled after pass 1, so
they are checked and unscaled here. These are private GradScaler attributes (torch 2.x); ``tests/test_amp.py`` pins
the behaviour.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_sam.distributed import all_reduce_max_, world_size
from lightning_sam.tensor_ops import group_by_device, non_finite_flag

Warn = Callable[[str], object]


def gradients_of(optimizer: Optimizer) -> list[Tensor]:
    """The gradients of the optimizer's parameters that have one."""
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def drop_gradients(optimizer: Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)`` without its per-call overhead (profiler scope, hooks): every
    parameter of the optimizer loses its gradient, so the next backward writes fresh ones and ``optimizer.step()``
    skips a parameter left without one."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def _agreed(flag: Tensor, across_ranks: bool) -> bool:
    """``flag`` (1.0 = non-finite) as a bool, MAX-reduced over ranks first when ``across_ranks`` (one host sync)."""
    if across_ranks and world_size() > 1:
        all_reduce_max_(flag)
    return bool(flag.item())


class NoScaling:
    """32-true, bf16-mixed, 64-true: gradients are never scaled.

    With ``skip_nonfinite``, a step whose pass-2 loss is inf/NaN on any rank skips its update: every gradient is
    dropped before ``optimizer.step()`` (torch optimizers leave parameters without one, and their state, untouched),
    with a warning. That check is one host sync per SAM step (and a MAX all-reduce under DDP, where pass-2 losses are
    local while the gradients are shared, so that every rank decides alike).
    """

    def __init__(self, *, skip_nonfinite: bool = True, adapter: str = "SAMEngine", warn: Warn | None = None) -> None:
        self.skip_nonfinite = skip_nonfinite
        self.adapter = adapter
        self.warn: Warn = warn or (lambda message: warnings.warn(message, stacklevel=3))

    def first_pass_overflowed(self, optimizer: Optimizer | None) -> bool:
        return False

    def unscale_between_ascents(self, optimizer: Optimizer | None) -> None:
        return None

    def finish_second_pass(self, optimizer: Optimizer | None) -> None:
        return None

    def step_skipped(self, optimizer: Optimizer | None, second_loss: Tensor | None, step: int) -> bool:
        """Whether the coming ``optimizer.step()`` leaves everything unchanged (here: made so for a non-finite
        pass 2)."""
        if not self.skip_nonfinite or second_loss is None or optimizer is None:
            return False
        if world_size() == 1:  # one read of the (0-dim) loss, no tensor op
            loss = second_loss.detach()
            if math.isfinite(loss.item()) if loss.numel() == 1 else bool(torch.isfinite(loss).all()):
                return False
        elif not _agreed((~torch.isfinite(second_loss.detach())).float().reshape(()), across_ranks=True):
            return False
        drop_gradients(optimizer)
        self.warn(
            f"{self.adapter}: the loss at the perturbed weights is not finite at step {step}: this optimizer step is "
            "skipped (weights and optimizer state unchanged). If it repeats, lower rho or the learning rate "
            "(skip_nonfinite=False lets such steps through)."
        )
        return True

    def skip_flag(self, optimizer: Optimizer | None) -> Tensor | None:
        """1.0 when the optimizer will skip this step, as a 0-dim tensor (no host sync); None: never skips."""
        return None

    def logged_loss(self, loss: Tensor) -> Tensor:
        """``loss`` as recorded by the adapter, unscaled."""
        return loss

    def gradient_scale(self) -> Tensor | None:
        """The scale the gradients still carry (manual optimization before ``optimizer.step()``), or None."""
        return None


class GradScaling(NoScaling):
    """16-mixed with a ``torch.amp.GradScaler``.

    Args:
        scaler: the precision plugin's scaler.
        optimizer: the optimizer it steps.
        unscaled_by_caller: True in automatic optimization, where Lightning has unscaled pass 1 (and registered its
            found-inf) before SAM's hook, unless the optimizer unscales inside ``step`` (fused).
        across_ranks: the pass-1 overflow flag is MAX-reduced over ranks (a local pass 1 under DDP): every rank
            skips pass 2 together, or pass 2's all-reduce would deadlock.
    """

    def __init__(
        self, scaler: torch.amp.GradScaler, optimizer: Optimizer, *, unscaled_by_caller: bool, across_ranks: bool
    ) -> None:
        super().__init__(skip_nonfinite=False)
        self.scaler = scaler
        fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        self.registers = unscaled_by_caller and not fused  # we unscale pass 2 and OR its found-inf
        self.across_ranks = across_ranks

    # ------------------------------------------------------------------ questions of the step driver
    def first_pass_overflowed(self, optimizer: Optimizer) -> bool:
        """Whether pass 1 had an inf/NaN on any rank (one host sync; GradScaler syncs here anyway); if so, make sure
        GradScaler skips the step on this rank too (another rank may be the one that overflowed)."""
        if self.registers:
            registered = self._registered_found_inf(optimizer)
            if registered is None:
                return False
            found = registered.clone()
        else:
            # Nobody unscaled pass 1: check and unscale it here. Its gradients are discarded after the ascent, and an
            # inf survives unscaling, so the optimizer step still skips.
            found = self._unscale_(gradients_of(optimizer))
        if not _agreed(found, self.across_ranks):
            return False
        if self.registers:
            self._mark_found_inf(optimizer, found)
        else:
            grads = gradients_of(optimizer)  # GradScaler checks the gradients itself in step(): make them non-finite
            if grads:
                torch._foreach_mul_(grads, float("nan"))
        return True

    def unscale_between_ascents(self, optimizer: Optimizer) -> None:
        found = self._unscale_(gradients_of(optimizer))  # an overflow here skips the step (weights restored anyway)
        if self.registers:
            self._mark_found_inf(optimizer, found)

    @torch.no_grad()
    def finish_second_pass(self, optimizer: Optimizer) -> None:
        """Unscale pass 2's gradients and OR their found-inf into the scaler's state (where the caller unscaled pass 1;
        otherwise they stay scaled for the optimizer step that unscales them)."""
        if not self.registers:
            return
        found = torch.full((), 0.0, dtype=torch.float32, device=self._inverse_scale().device)
        for flag in self.scaler._unscale_grads_(optimizer, self._inverse_scale(), found, False).values():
            self._mark_found_inf(optimizer, flag)

    def step_skipped(self, optimizer: Optimizer, second_loss: Tensor | None, step: int) -> bool:
        flag = self.skip_flag(optimizer)
        return bool(flag.item())  # one host sync: GradScaler syncs on its found-inf in step() anyway

    def skip_flag(self, optimizer: Optimizer) -> Tensor:
        if self.registers:
            registered = self._registered_found_inf(optimizer)
            if registered is not None:
                return registered.float()
        grads = gradients_of(optimizer)
        return non_finite_flag(grads) if grads else torch.zeros(())

    def logged_loss(self, loss: Tensor) -> Tensor:
        """Losses seen by ``on_before_backward`` in automatic optimization are scaled: unscale them."""
        return loss * self._inverse_scale().to(loss.device) if self.registers else loss

    def gradient_scale(self) -> Tensor | None:
        return None if self.registers else self.scaler._scale

    # ------------------------------------------------------------------ GradScaler internals
    def _inverse_scale(self) -> Tensor:
        """``1 / scale`` exactly as GradScaler computes it (double reciprocal, then fp32), without a host sync."""
        self.scaler._check_scale_growth_tracker("unscale_")
        return self.scaler._scale.double().reciprocal().float()  # type: ignore[union-attr]

    @torch.no_grad()
    def _unscale_(self, grads: Sequence[Tensor]) -> Tensor:
        """Unscale ``grads`` in place; a 0-dim fp32 flag, 1.0 if any was inf/NaN (not registered anywhere)."""
        inv = self._inverse_scale()
        found = torch.zeros((), dtype=torch.float32, device=inv.device)
        for device, indices in group_by_device(grads).items():
            by_dtype: dict[torch.dtype, list[Tensor]] = {}
            for i in indices:
                by_dtype.setdefault(grads[i].dtype, []).append(grads[i])
            found_here = torch.zeros(1, dtype=torch.float32, device=device)
            for tensors in by_dtype.values():
                torch._amp_foreach_non_finite_check_and_unscale_(tensors, found_here, inv.to(device))
            found = torch.maximum(found, found_here.to(found.device).reshape(()))
        return found

    def _registered_found_inf(self, optimizer: Optimizer) -> Tensor | None:
        """The scaler's found-inf for ``optimizer`` since the last ``update`` (max over devices), or None if unset."""
        state = self.scaler._per_optimizer_states.get(id(optimizer))
        flags = list(state["found_inf_per_device"].values()) if state else []
        if not flags:
            return None
        device = flags[0].device
        return torch.stack([f.to(device).reshape(()) for f in flags]).max()

    def _mark_found_inf(self, optimizer: Optimizer, flag: Tensor) -> None:
        """OR ``flag`` (1.0 = non-finite) into the scaler's found-inf for ``optimizer`` on ``flag``'s device."""
        state = self.scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        if flag.device in state:
            current = state[flag.device]
            current.copy_(torch.maximum(current, flag.reshape(current.shape).to(current.dtype)))
        else:
            state[flag.device] = flag.reshape(()).to(torch.float32).clone()


Precision = NoScaling | GradScaling
