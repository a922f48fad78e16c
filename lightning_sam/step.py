"""SAM's step, written once: what every adapter (callback, mixin, Fabric loop, ``SAMEngine.step``) runs.

::

    plan          second pass this step?  (no: pass 1 must all-reduce under DDP, the step is a plain one)
    pass 1        the adapter's (Lightning's closure), or replay.first_pass(sync)
    ascend        w <- w + e                                      (skipped when pass 1 overflowed under GradScaler)
    pass 2        replay.second_pass(sync) at w + e, k times for multi-step variants (only the last one syncs)
    descend       the variant's descent gradient (probes through replay.probe), then w <- saved w, bit-exactly
    skip?         GradScaler's overflow, or a non-finite pass 2 (then the update is dropped)

The adapter supplies a *replay* (how to run the batch's pass again, and a side-effect-free loss probe) and a
*precision* object (:mod:`lightning_sam.precision`); the driver owns the order. Pure PyTorch: no Lightning import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from torch import Tensor
from torch.optim import Optimizer

from lightning_sam.precision import NoScaling, Precision, drop_gradients

if TYPE_CHECKING:
    from lightning_sam.engine import SAMEngine


class Replay(Protocol):
    """How an adapter runs its step's batch again. ``second_pass`` runs forward + backward at the current weights
    (the gradient is accumulated into ``.grad``; ``sync``: all-reduce it under DDP) and returns the loss as the
    adapter records it; ``probe`` returns the loss at the current weights without backward and without side effects;
    ``probe_clobbers_grads`` says that ``probe`` does run a backward (a training closure)."""

    probe_clobbers_grads: bool

    def second_pass(self, sync: bool) -> Tensor: ...

    def probe(self) -> Tensor: ...


class FullReplay(Replay, Protocol):
    """A replay that also runs pass 1 (mixin, Fabric, plain loops; under Lightning's automatic optimization pass 1
    is Lightning's own)."""

    def first_pass(self, sync: bool) -> Tensor: ...


@dataclass
class StepOutcome:
    """What one step did: whether pass 2 ran, ``||e||`` and the last pass-2 loss (None without pass 2), and whether
    the optimizer will leave everything unchanged (a non-finite step)."""

    second_pass: bool
    perturbation_norm: Tensor | None = None
    second_loss: Tensor | None = None
    skipped: bool = False


class TwoPassStep:
    """The step driver over one engine and one precision object (one per fit).

    Args:
        engine: the :class:`~lightning_sam.SAMEngine` of the trained parameters.
        precision: :class:`~lightning_sam.precision.NoScaling` (default) or ``GradScaling``.
        sync_ascent: under DDP, all-reduce pass 1 too (else it is local whenever pass 2 follows).
    """

    def __init__(self, engine: SAMEngine, precision: Precision | None = None, *, sync_ascent: bool = False) -> None:
        self.engine = engine
        self.precision: Precision = precision or NoScaling()
        self.sync_ascent = sync_ascent
        self.planned = True
        self.collections = 0  # calls of collect_samples that gathered samples

    def plan(self) -> bool:
        """Decide, before pass 1, whether this step runs pass 2; returns whether pass 1 must all-reduce (a step
        without pass 2 descends on pass 1's gradient, so every rank needs the same one)."""
        self.planned = self.engine.needs_second_pass()
        return self.sync_ascent or not self.planned

    def collect_samples(self, loss_of_slice: Callable[[int, int], Tensor], batch_size: int) -> int:
        """Per-sample gradients of the batch for variants that want them this step (SSAM's Fisher); before pass 1."""
        if not self.engine.samples_needed():
            return 0
        self.collections += 1
        return self.engine.collect_samples(loss_of_slice, batch_size)

    def run(
        self, optimizer: Optimizer | None, replay: FullReplay, *, measure: bool = True
    ) -> tuple[Tensor, StepOutcome]:
        """Pass 1 through ``replay`` and everything after it; returns the pass-1 loss and the outcome. The caller
        then runs :meth:`before_optimizer_step` and ``optimizer.step()``."""
        loss = replay.first_pass(self.plan())
        return loss, self.after_first_pass(optimizer, replay, measure=measure)

    def after_first_pass(self, optimizer: Optimizer | None, replay: Replay, *, measure: bool = True) -> StepOutcome:
        """Ascent, pass(es) 2, descent and exact restore, after pass 1 left ``g`` in ``.grad``. Without ``optimizer``
        (a closure that zeroes the gradients itself) nothing is zeroed here and the precision must be NoScaling.
        ``measure``: compute ``||e||`` (a pass over ``e``; the adapters ask on the steps that log it only)."""
        engine, precision = self.engine, self.precision
        if not self.planned or precision.first_pass_overflowed(optimizer):
            engine.plain_step()  # no pass 2 (planned so, or GradScaler skips this step and lowers the scale once)
            return StepOutcome(second_pass=False)
        perturbation_norm = engine.ascend(measure=measure)
        if perturbation_norm is None:  # no parameter has a gradient
            engine.plain_step()
            return StepOutcome(second_pass=False)
        loss: Tensor | None = None
        try:
            passes = engine.ascent_steps
            for index in range(passes):
                if index:  # multi-step variants ascend again from the previous pass's (local) gradient
                    precision.unscale_between_ascents(optimizer)
                    engine.ascend(measure=False)  # ||e|| is the first ascent's
                if optimizer is not None:  # pass 2 writes fresh gradients (no zeroing, no accumulation into zeros)
                    drop_gradients(optimizer)
                loss = replay.second_pass(index == passes - 1)
            precision.finish_second_pass(optimizer)
            engine.descend(evaluate=replay.probe, evaluate_clobbers_grads=replay.probe_clobbers_grads)
        finally:
            engine.restore()
        skipped = precision.step_skipped(optimizer, loss, engine.step_count - 1)
        return StepOutcome(True, perturbation_norm if measure else None, loss, skipped)

    def before_optimizer_step(self, optimizer: Optimizer) -> None:
        """The variant's pre-step rule (BAR), after the descent gradient is final; a no-op for most variants."""
        if self.engine.has_before_step:
            self.engine.before_optimizer_step(optimizer, self.precision.skip_flag(optimizer))
