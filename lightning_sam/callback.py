"""SAMCallback: SAM and its variants for any LightningModule with automatic optimization.

How a step runs (Lightning 2.6, automatic optimization)::

    on_train_batch_start      keep the (micro-)batch; plan the step (DDP's gradient sync off for a local pass 1)
    training_step + backward  Lightning's own closure: pass 1 -> g (all micro-batches of the window)
    on_before_optimizer_step  (here) the step driver (lightning_sam.step): ascend, pass 2 through trainer.strategy
                              (DDP all-reduce, autocast, GradScaler) on the micro-batches that produced a loss,
                              descent gradient, exact restore
    gradient clipping         Lightning's, on the unscaled descent gradient
    optimizer.step()          the user's optimizer, untouched

Pass 2 has no side effect the user can see: ``self.log`` calls are not recorded again, torchmetrics states
and BatchNorm running statistics are as pass 1 left them (see :mod:`lightning_sam.side_effects`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer

from lightning_sam import validation as check
from lightning_sam.batches import batch_size_of, batchnorm_in_eval, slice_batch
from lightning_sam.engine import SAMEngine
from lightning_sam.glue import (
    build_engine,
    check_trainer,
    engine_checkpoint_state,
    engine_state_for_this_rank,
    log_step,
    loss_from_output,
    precision_for,
    validate_schedule,
    warn_if_samples_outlast_epoch,
)
from lightning_sam.replays import StrategyReplay, training_step_of
from lightning_sam.side_effects import SecondPassGuard
from lightning_sam.step import TwoPassStep
from lightning_sam.strategies import set_gradient_sync
from lightning_sam.variants import Variant, resolve_variant


class SAMCallback(Callback):
    """Train any automatic-optimization LightningModule with SAM or one of its variants. No module changes.

    Args:
        variant: a name from :func:`lightning_sam.available_variants` (``"sam"``, ``"asam"``, ...), or a variant
            object such as ``SSAM(sparsity=0.5)`` (LightningCLI: ``class_path`` / ``init_args``).
        rho: neighbourhood radius; ``None`` takes the variant's default (SAM 0.05, ASAM 0.5). With a variant name only.
        sync_ascent: under DDP, all-reduce pass 1 too (global-gradient SAM). Default False: each rank ascends
            with its own gradient (the paper's m-sharpness; half the communication); pass 2 always all-reduces.
        interval: run the variant's ascent and pass 2 on every ``interval``-th optimizer step only (default 1);
            the other steps are plain optimizer steps on ``g`` with no second forward/backward.
        params: which parameters are perturbed (and counted in the gradient norm): ``None`` (all trained ones),
            ``"norm"`` (normalization layers only: SAM-ON) or a callable ``(name, parameter) -> bool``.
        skip_nonfinite: skip the optimizer step (weights and optimizer state untouched, with a warning) when the
            loss at the perturbed weights is inf/NaN, which plain training would not meet at ``w``. Costs one host
            sync per SAM step (not under 16-mixed, whose GradScaler skips such steps itself); ``False`` removes the
            check and lets the non-finite gradient reach the optimizer, as plain Lightning does.
        **variant_options: the variant's options, named as on the variant's docs page (ASAM: ``eta``), with a
            variant name only.

    Example::

        trainer = Trainer(callbacks=[SAMCallback(variant="asam", rho=0.5)])
        trainer = Trainer(callbacks=[SAMCallback(variant=SSAM(sparsity=0.7))])

    Logged each step through Lightning: ``sam/sharpness`` (pass-2 loss minus pass-1 loss) and
    ``sam/perturbation_norm`` (``||e||``). A ``training_step`` returning None skips SAM for that step.
    ``on_before_backward`` / ``on_after_backward`` fire in both passes; :func:`lightning_sam.in_second_pass`
    tells them (and ``training_step``) which one is running.
    """

    def __init__(
        self,
        variant: Variant | str = "sam",
        rho: float | None = None,
        *,
        sync_ascent: bool = False,
        interval: int = 1,
        params: str | Callable[[str, Tensor], bool] | None = None,
        skip_nonfinite: bool = True,
        **variant_options: Any,
    ) -> None:
        super().__init__()
        self.spec = resolve_variant(variant, rho, **variant_options)  # validated now, not in training
        validate_schedule(interval, params)
        self.sync_ascent = check.flag("", "sync_ascent", sync_ascent)
        self.skip_nonfinite = check.flag("", "skip_nonfinite", skip_nonfinite)
        self.interval = interval
        self.params = params
        self.engine: SAMEngine | None = None
        self.driver: TwoPassStep | None = None
        self._pending_state: dict[str, Any] | None = None
        self._guard: SecondPassGuard | None = None
        self._window: list[tuple[Any, int]] = []  # the micro-batches of this step whose pass 1 produced a loss
        self._window_open = False  # a micro-batch of the coming optimizer step has started
        self._current: tuple[Any, int] | None = None  # the micro-batch running now
        self._losses: list[Tensor | None] = [None, None]  # pass 1, pass 2: as on_before_backward saw them
        self._in_second_pass = False
        self._samples_warned = False

    # ------------------------------------------------------------------ identity and state
    @property
    def variant(self) -> str:
        """The variant's name."""
        return self.spec.name

    @property
    def variant_options(self) -> dict[str, Any]:
        """The options given to the variant (``rho`` aside)."""
        return {k: v for k, v in self.spec.config.items() if k != "rho"}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(variant=self.variant)

    @property
    def in_second_pass(self) -> bool:
        """True while this callback re-runs ``training_step`` at the perturbed weights."""
        return self._in_second_pass

    def state_dict(self) -> dict[str, Any]:
        return dict(self._pending_state or {}) if self.engine is None else engine_checkpoint_state(self.engine)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.engine is not None:
            self.engine.load_state_dict(engine_state_for_this_rank(state_dict))
        else:
            self._pending_state = dict(state_dict)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "SAMCallback needs automatic optimization, but this module sets automatic_optimization = False. "
                "For manual optimization, mix in lightning_sam.SAMMixin and call self.sam_step(...) in "
                "training_step instead of using the callback."
            )
        others = [c for c in trainer.callbacks if isinstance(c, SAMCallback) and c is not self]  # type: ignore[attr-defined]
        if others:
            raise RuntimeError(
                f"The Trainer has {len(others) + 1} SAMCallbacks ({self!r}, {', '.join(map(repr, others))}); each "
                "would perturb the weights and run its own second pass every step. Keep one SAMCallback (with "
                "LightningCLI, check --trainer.callbacks and the config files for a second one)."
            )
        check_trainer(trainer, self.sync_ascent)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise RuntimeError(
                f"SAMCallback needs exactly one optimizer, found {len(trainer.optimizers)}. Put all parameters in "
                "one optimizer (param groups may carry their own 'sam_rho' or 'sam_exclude=True')."
            )
        optimizer = trainer.optimizers[0]
        self.engine = build_engine(
            trainer, pl_module, optimizer, self.spec, "SAMCallback", select=self.params, interval=self.interval
        )
        if self._pending_state:
            self.engine.load_state_dict(engine_state_for_this_rank(self._pending_state))
            self._pending_state = None
        precision = precision_for(
            trainer,
            optimizer,
            automatic=True,
            sync_ascent=self.sync_ascent,
            skip_nonfinite=self.skip_nonfinite,
            adapter="SAMCallback",
        )
        self.driver = TwoPassStep(self.engine, precision, sync_ascent=self.sync_ascent)
        self._guard = SecondPassGuard(pl_module)
        self._window, self._window_open = [], False

    # ------------------------------------------------------------------ pass 1
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._window, self._window_open = [], False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.engine is not None and self.driver is not None
        if self.engine.samples_needed():
            if self.engine.step_count == 0 and not self._samples_warned:
                self._samples_warned = True
                wanted, size = self.engine.samples_needed(), batch_size_of(batch)
                warn_if_samples_outlast_epoch(trainer, self.variant, wanted, size, "SAMCallback")
            self._collect_samples(pl_module, batch, batch_idx)
        if not self._window_open:  # the first micro-batch of an optimizer step
            self._window_open = True
            self._sync_first_pass = self.driver.plan()
            self._losses = [None, None]
        self._current = (batch, batch_idx)
        set_gradient_sync(trainer, self._sync_first_pass)

    def _collect_samples(self, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Per-sample gradients of this batch for the variant (SSAM's Fisher), with no visible side effect:
        ``training_step`` on slices of the batch, on the LightningModule itself (local passes: only the squared
        gradients are summed over ranks), BatchNorm on its running statistics, logs/metrics/buffers restored."""
        assert self.driver is not None and self._guard is not None

        def loss_of_slice(start: int, stop: int) -> Tensor:
            loss = loss_from_output(training_step_of(pl_module, slice_batch(batch, start, stop), batch_idx))
            if loss is None:
                raise RuntimeError("training_step returned None on a slice of the batch during SSAM's Fisher pass")
            return loss

        self._in_second_pass = True
        try:
            with self._guard.active(), batchnorm_in_eval(pl_module):
                self.driver.collect_samples(loss_of_slice, batch_size_of(batch))
        finally:
            self._in_second_pass = False

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        index = 1 if self._in_second_pass else 0
        value = loss.detach()
        self._losses[index] = value if self._losses[index] is None else self._losses[index] + value
        if not self._in_second_pass and self._current is not None:
            self._window.append(self._current)  # pass 2 replays exactly the micro-batches that reached backward

    # ------------------------------------------------------------------ pass 2
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        window, self._window = self._window, []
        opened, self._window_open = self._window_open, False
        assert self.engine is not None and self.driver is not None
        if not opened:
            raise RuntimeError(
                f"{type(optimizer).__name__}.step evaluated its closure more than once in one optimizer step (a line "
                "search?): SAMCallback perturbs the weights once per step and supports optimizers that evaluate the "
                "closure once (SGD, Adam, AdamW, ...)."
            )
        if not window:  # training_step returned None for every micro-batch: no backward, no SAM this step
            self.engine.plain_step()  # Lightning still counts the optimizer step: keep the schedules aligned
            return
        try:
            replay = StrategyReplay(self, trainer, pl_module, optimizer, window)
            outcome = self.driver.after_first_pass(optimizer, replay)
        finally:
            self._in_second_pass = False
            set_gradient_sync(trainer, True)
        self.driver.before_optimizer_step(optimizer)
        log_step(pl_module, self.engine, self.driver.precision, outcome, self._losses[0])

    # ------------------------------------------------------------------ safety nets
    def _restore(self) -> None:
        if self.engine is not None:
            self.engine.restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._restore()

    def __repr__(self) -> str:
        return f"SAMCallback(variant={self.spec!r}, sync_ascent={self.sync_ascent})"
