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

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer

from lightning_sam.batches import batch_size_of, slice_batch
from lightning_sam.checkpointing import engine_checkpoint_state, entry_for_resume, put_engine_tensors, state_for_engine
from lightning_sam.engine import SAMEngine
from lightning_sam.glue import build_driver, check_trainer, collect_samples, loss_from_output
from lightning_sam.metrics import StepMetrics, should_log
from lightning_sam.replays import PassLosses, StrategyReplay, training_step_of
from lightning_sam.settings import SAMSettings
from lightning_sam.side_effects import SecondPassGuard
from lightning_sam.step import TwoPassStep
from lightning_sam.strategies import set_gradient_sync, writes_distributed_checkpoint


class SAMCallback(SAMSettings, Callback):
    """Train any automatic-optimization LightningModule with SAM or one of its variants. No module changes.

    Takes the options of :class:`lightning_sam.settings.SAMSettings`: ``variant`` (a name or a variant object),
    ``rho``, ``sync_ascent``, ``interval``, ``params``, ``skip_nonfinite`` and the variant's options.

    Example::

        trainer = Trainer(callbacks=[SAMCallback(variant="asam", rho=0.5)])
        trainer = Trainer(callbacks=[SAMCallback(variant=SSAM(sparsity=0.7))])

    Logged through Lightning on its logging cadence (``log_every_n_steps``), with epoch means: ``sam/sharpness``
    (pass-2 loss minus pass-1 loss) and ``sam/perturbation_norm`` (``||e||``); see
    :class:`lightning_sam.metrics.StepMetrics`. A ``training_step`` returning None skips SAM for that step.
    ``on_before_backward`` / ``on_after_backward`` fire in both passes; :func:`lightning_sam.in_second_pass`
    tells them (and ``training_step``) which one is running.
    """

    # State of a fit, set up in on_fit_start (the options themselves are SAMSettings')
    engine: SAMEngine | None = None
    driver: TwoPassStep | None = None
    _pending_state: dict[str, Any] | None = None
    _guard: SecondPassGuard | None = None
    _window_open = False  # a micro-batch of the coming optimizer step has started
    _current: tuple[Any, int] | None = None  # the micro-batch running now
    _passes = PassLosses()  # replaced per step; a class default so that in_second_pass works before fit
    _tensors_apart = False  # per-rank state tensors go through the distributed checkpoint (ModelParallelStrategy)
    _rank_tensors: dict[str, Tensor] | None = None  # this rank's, from state_dict() to on_save_checkpoint

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(variant=self.variant)

    @property
    def in_second_pass(self) -> bool:
        """True while this callback re-runs ``training_step`` at the perturbed weights."""
        return self._passes.in_second_pass

    def state_dict(self) -> dict[str, Any]:
        if self.engine is None:
            return dict(self._pending_state or {})
        entry, self._rank_tensors = engine_checkpoint_state(self.engine, tensors_apart=self._tensors_apart)
        return entry

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.engine is not None:
            self.engine.load_state_dict(state_for_engine(state_dict, self.engine))
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
        state, self._pending_state = self._pending_state, None
        self.driver = build_driver(
            trainer, pl_module, trainer.optimizers[0], self, "SAMCallback", automatic=True, state=state
        )
        self.engine = self.driver.engine
        self._tensors_apart = writes_distributed_checkpoint(trainer)
        self._guard = SecondPassGuard(pl_module)
        self._window: list[tuple[Any, int]] = []  # the micro-batches of this step whose pass 1 produced a loss
        self._window_open = False
        self._passes = PassLosses()
        self._metrics = StepMetrics()

    # ------------------------------------------------------------------ pass 1
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._window, self._window_open = [], False

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._metrics.epoch_end(pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.engine is not None and self.driver is not None and self._guard is not None
        if self.engine.samples_needed():  # slices of the batch through training_step on the module itself (local)

            def loss_of_slice(start: int, stop: int) -> Tensor:
                loss = loss_from_output(training_step_of(pl_module, slice_batch(batch, start, stop), batch_idx))
                if loss is None:
                    raise RuntimeError("training_step returned None on a slice of the batch during SSAM's Fisher pass")
                return loss

            self._passes.in_second_pass = True
            try:
                size = batch_size_of(batch)
                collect_samples(self.driver, pl_module, self._guard, loss_of_slice, size, "SAMCallback")
            finally:
                self._passes.in_second_pass = False
        if not self._window_open:  # the first micro-batch of an optimizer step
            self._window_open = True
            self._sync_first_pass = self.driver.plan()
            self._passes = PassLosses()
        self._current = (batch, batch_idx)
        set_gradient_sync(trainer, self._sync_first_pass)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        self._passes.add(loss.detach())
        if not self._passes.in_second_pass and self._current is not None:
            self._window.append(self._current)  # pass 2 replays exactly the micro-batches that reached backward

    # ------------------------------------------------------------------ pass 2
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        window, self._window = self._window, []
        opened, self._window_open = self._window_open, False
        assert self.engine is not None and self.driver is not None and self._guard is not None
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
            replay = StrategyReplay(trainer, pl_module, optimizer, window, self._guard, self._passes)
            logging = should_log(trainer)
            outcome = self.driver.after_first_pass(optimizer, replay, measure=logging)
        finally:
            self._passes.in_second_pass = False
            set_gradient_sync(trainer, True)
        self.driver.before_optimizer_step(optimizer)
        self._metrics.record(pl_module, self.engine, self.driver.precision, outcome, self._passes.first, logging)

    # ------------------------------------------------------------------ safety nets
    def _restore(self) -> None:
        if self.engine is not None:
            self.engine.restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._restore()  # (state_dict() ran before this hook: the weights it saw are restored by every step's end)
        tensors, self._rank_tensors = self._rank_tensors, None
        put_engine_tensors(checkpoint, 0, tensors or {})

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:  # runs before load_state_dict: read this rank's tensors of a distributed save
            states[self.state_key] = entry_for_resume(states[self.state_key], trainer, 0)

    def __repr__(self) -> str:
        return f"SAMCallback(variant={self.spec!r}, sync_ascent={self.sync_ascent})"
