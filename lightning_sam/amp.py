"""The GradScaler (16-mixed) internals that SAM's second pass has to touch, in one place.

Why this module exists: Lightning's ``MixedPrecision`` plugin unscales the gradients of *one* backward per
optimizer step (it calls ``scaler.unscale_(optimizer)`` before ``on_before_optimizer_step``). SAM runs a second
backward after that, whose gradients are scaled again and which ``GradScaler`` would never unscale (the first
descent step would be ``scale`` times too large), and whose overflow ``GradScaler`` would never see. So:

* pass 2's gradients are unscaled with GradScaler's own ``_unscale_grads_`` and its found-inf is OR-ed into
  ``scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]``: an overflow in either pass then
  makes ``scaler.step`` skip the step and ``scaler.update`` lower the scale exactly once;
* optimizers that unscale inside ``step`` (``_step_supports_amp_scaling``, e.g. ``Adam(fused=True)``) are left
  to do so; for them the pass-1 gradients are still scaled at the hook, so we check and unscale them ourselves.

These are private GradScaler attributes (torch 2.x); ``tests/test_amp.py`` pins the behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_sam.tensor_ops import group_by_device, non_finite_flag


def handles_unscaling(optimizer: Optimizer) -> bool:
    """True for optimizers that unscale inside ``step`` (fused Adam/AdamW/SGD)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def inverse_scale(scaler: torch.amp.GradScaler) -> Tensor:
    """``1 / scale`` exactly as GradScaler computes it (double reciprocal, then fp32), without a host sync."""
    scaler._check_scale_growth_tracker("unscale_")
    return scaler._scale.double().reciprocal().float()  # type: ignore[union-attr]


@torch.no_grad()
def unscale_(grads: Sequence[Tensor], scaler: torch.amp.GradScaler) -> Tensor:
    """Unscale ``grads`` in place and return a 0-dim float: 1.0 if any was inf/NaN (not registered anywhere)."""
    inv = inverse_scale(scaler)
    found = torch.zeros((), dtype=torch.float32, device=inv.device)
    for device, indices in group_by_device(grads).items():
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for i in indices:
            by_dtype.setdefault(grads[i].dtype, []).append(grads[i])
        found_here = torch.zeros(1, dtype=torch.float32, device=device)
        inv_here = inv.to(device)
        for tensors in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found_here, inv_here)
        found = torch.maximum(found, found_here.to(found.device).reshape(()))
    return found


def registered_found_inf(scaler: torch.amp.GradScaler, optimizer: Optimizer) -> Tensor | None:
    """The scaler's found-inf for ``optimizer`` since the last ``update`` (max over devices), or None if unset."""
    state = scaler._per_optimizer_states.get(id(optimizer))
    flags = list(state["found_inf_per_device"].values()) if state else []
    if not flags:
        return None
    device = flags[0].device
    return torch.stack([f.to(device).reshape(()) for f in flags]).max()


@torch.no_grad()
def unscale_second_pass_(scaler: torch.amp.GradScaler, optimizer: Optimizer) -> None:
    """Unscale pass 2's gradients of ``optimizer`` and OR their found-inf into the scaler's state.

    Call only when the scaler already unscaled pass 1 for this optimizer (stage UNSCALED), i.e. in the
    automatic-optimization hook with an optimizer that does not unscale inside ``step``.
    """
    inv = inverse_scale(scaler)
    found = torch.full((), 0.0, dtype=torch.float32, device=inv.device)  # GradScaler's own convention
    per_device = scaler._unscale_grads_(optimizer, inv, found, False)
    for flag in per_device.values():
        mark_found_inf(scaler, optimizer, flag)


def mark_found_inf(scaler: torch.amp.GradScaler, optimizer: Optimizer, flag: Tensor) -> None:
    """OR ``flag`` (1.0 = non-finite) into the scaler's found-inf for ``optimizer`` on ``flag``'s device."""
    state = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    device = flag.device
    if device in state:
        current = state[device]
        current.copy_(torch.maximum(current, flag.reshape(current.shape).to(current.dtype)))
    else:
        state[device] = flag.reshape(()).to(torch.float32).clone()


@torch.no_grad()
def poison_(grads: Sequence[Tensor]) -> None:
    """Make ``grads`` non-finite so that GradScaler's own check skips the step and lowers the scale once.

    Used when another rank overflowed in a local pass 1 (the all-reduced flag says skip) but this rank's
    gradients are finite, on paths where GradScaler checks the gradients itself after our hook (fused optimizers,
    manual optimization): every rank must skip together or the replicas diverge.
    """
    if grads:
        torch._foreach_mul_(list(grads), float("nan"))


def step_will_be_skipped(scaler: torch.amp.GradScaler, optimizer: Optimizer, grads: Sequence[Tensor]) -> Tensor:
    """0-dim fp32: 1.0 if GradScaler will skip this optimizer step (no host sync)."""
    if not handles_unscaling(optimizer):
        registered = registered_found_inf(scaler, optimizer)
        if registered is not None:
            return registered.float()
    return non_finite_flag(grads) if grads else torch.zeros(())
