"""The replays the Lightning adapters hand to the step driver (:mod:`lightning_sam.step`): how to run the step's
batch again at the current weights, and a side-effect-free loss probe.

* :class:`StrategyReplay` (``SAMCallback``): the window's micro-batches through ``trainer.strategy`` (DDP's wrapper,
  autocast, GradScaler's loss scaling), each loss divided by ``accumulate_grad_batches`` as Lightning divides pass 1.
* :class:`ManualReplay` (``SAMMixin``): the user's ``loss_fn`` with ``manual_backward``.

Both run the extra passes under a :class:`~lightning_sam.side_effects.SecondPassGuard` (no visible side effect).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor
from torch.optim import Optimizer

from lightning_sam.glue import loss_from_output
from lightning_sam.side_effects import SecondPassGuard
from lightning_sam.strategies import set_gradient_sync
from lightning_sam.tensor_ops import widen


def takes_batch_idx(pl_module: LightningModule) -> bool:
    """Whether ``training_step`` takes ``batch_idx`` (inspected once per function: signatures are slow)."""
    step = pl_module.training_step
    key = getattr(step, "__func__", step)
    cached = _TAKES_BATCH_IDX.get(key)
    if cached is None:
        cached = _TAKES_BATCH_IDX[key] = is_param_in_hook_signature(step, "batch_idx", min_args=2)
    return cached


_TAKES_BATCH_IDX: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def training_step_of(pl_module: LightningModule, batch: Any, batch_idx: int) -> Any:
    """``training_step`` on the module itself (not through the strategy), with ``batch_idx`` if it takes one."""
    return pl_module.training_step(batch, batch_idx) if takes_batch_idx(pl_module) else pl_module.training_step(batch)


class PassLosses:
    """The losses Lightning's backward saw in the current step (``on_before_backward``), per pass, and which pass is
    running (the callback's ``in_second_pass``)."""

    def __init__(self) -> None:
        self.first: Tensor | None = None
        self.second: Tensor | None = None
        self.in_second_pass = False

    def add(self, loss: Tensor) -> None:
        if self.in_second_pass:
            self.second = loss if self.second is None else self.second + loss
        else:
            self.first = loss if self.first is None else self.first + loss


class StrategyReplay:
    """The callback's replay: the window's micro-batches again through ``trainer.strategy`` (DDP, autocast,
    GradScaler's loss scaling), each loss divided by ``accumulate_grad_batches`` as Lightning divides pass 1."""

    probe_clobbers_grads = False

    def __init__(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        optimizer: Optimizer,
        window: list[tuple[Any, int]],
        guard: SecondPassGuard,
        passes: PassLosses,
    ) -> None:
        self.trainer, self.pl_module, self.optimizer, self.window = trainer, pl_module, optimizer, window
        self.guard, self.passes = guard, passes
        self.with_index = takes_batch_idx(pl_module)

    def second_pass(self, sync: bool) -> Tensor:
        """Pass 2 on every micro-batch of the window, without side effects; with ``sync``, DDP all-reduces on the
        last one. Returns the summed loss as ``on_before_backward`` saw it."""
        strategy, passes = self.trainer.strategy, self.passes
        passes.second, passes.in_second_pass = None, True
        with self.guard.active():
            for i, (batch, batch_idx) in enumerate(self.window):
                set_gradient_sync(self.trainer, sync and i == len(self.window) - 1)
                loss = loss_from_output(strategy.training_step(*((batch, batch_idx) if self.with_index else (batch,))))
                if loss is None:
                    raise RuntimeError(
                        "training_step returned None in SAM's second pass although it returned a loss in the first; "
                        "skip batches deterministically (the same way in both passes)."
                    )
                strategy.backward(loss / self.trainer.accumulate_grad_batches, self.optimizer)
        assert passes.second is not None
        return passes.second

    def probe(self) -> Tensor:
        """The window's loss at the current weights: forward only, in training mode, without side effects."""
        total: Tensor | None = None
        self.passes.in_second_pass = True
        with torch.no_grad(), self.guard.active(), self.trainer.precision_plugin.train_step_context():
            for batch, batch_idx in self.window:
                loss = loss_from_output(training_step_of(self.pl_module, batch, batch_idx))
                if loss is None:
                    raise RuntimeError("training_step returned None during a loss probe")
                value = widen(loss.detach()) / self.trainer.accumulate_grad_batches
                total = value if total is None else total + value
        assert total is not None
        return total


class ManualReplay:
    """The mixin's replay: ``loss_fn()`` + ``manual_backward`` (Lightning's precision and strategy apply)."""

    probe_clobbers_grads = False

    def __init__(self, module: LightningModule, loss_fn: Callable[[], Tensor], guard: SecondPassGuard) -> None:
        self.module, self.loss_fn, self.guard = module, loss_fn, guard

    def first_pass(self, sync: bool) -> Tensor:
        set_gradient_sync(self.module.trainer, sync)
        loss = self.loss_fn()
        self.module.manual_backward(loss)
        set_gradient_sync(self.module.trainer, True)
        return loss.detach()

    def second_pass(self, sync: bool) -> Tensor:
        set_gradient_sync(self.module.trainer, sync)
        with self.guard.active():
            loss = self.loss_fn()
            self.module.manual_backward(loss)
        set_gradient_sync(self.module.trainer, True)
        return loss.detach()

    def probe(self) -> Tensor:
        """Forward-only loss at the current weights (XSAM's alpha search)."""
        with torch.no_grad(), self.guard.active():
            return self.loss_fn().detach()
