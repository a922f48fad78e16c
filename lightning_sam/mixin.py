"""SAMMixin: the whole SAM step in one call for LightningModules that use manual optimization.

Usage::

    class Net(SAMMixin, LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.configure_sam("asam", rho=0.5, gradient_clip_val=1.0)

        def training_step(self, batch, batch_idx):
            loss = self.sam_step(lambda: self.compute_loss(batch))   # pass 1, ascent, pass 2, restore,
            self.log("train_loss", loss)                              # clip, optimizer.step(), zero_grad()
            return loss

``sam_step(loss_fn)`` runs the step driver (:mod:`lightning_sam.step`) with ``loss_fn()`` + ``manual_backward`` as
its passes: Lightning's precision and strategy still apply, and pass 2 has no visible side effects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from lightning_sam.checkpointing import engine_checkpoint_state, entry_for_resume, put_engine_tensors
from lightning_sam.clipping import clip_gradients_, validate_clipping
from lightning_sam.engine import SAMEngine
from lightning_sam.glue import build_driver, check_trainer, collect_samples
from lightning_sam.metrics import StepMetrics, should_log
from lightning_sam.precision import gradients_of
from lightning_sam.replays import ManualReplay
from lightning_sam.settings import SAMSettings
from lightning_sam.sharding import ShardedReduction, local
from lightning_sam.side_effects import SecondPassGuard
from lightning_sam.step import TwoPassStep
from lightning_sam.strategies import writes_distributed_checkpoint
from lightning_sam.tensor_ops import global_norm
from lightning_sam.variants import Variant


class SAMMixin:
    """Mix into a ``LightningModule`` with ``automatic_optimization = False``; see :meth:`sam_step`."""

    _SAM_CHECKPOINT_KEY = "lightning_sam.SAMMixin"  # variant state per optimizer index in the module's checkpoint

    def configure_sam(
        self,
        variant: Variant | str = "sam",
        rho: float | None = None,
        *,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        **options: Any,
    ) -> None:
        """Choose the variant and how SAM runs (validated now), and the descent-gradient clipping. Call it in
        ``__init__``. ``variant``, ``rho`` and ``options`` are :class:`~lightning_sam.settings.SAMSettings`' (as for
        ``SAMCallback``); ``gradient_clip_val`` / ``gradient_clip_algorithm`` (``"norm"`` or ``"value"``) clip the
        unscaled descent gradient."""
        validate_clipping(gradient_clip_val, gradient_clip_algorithm)
        self._sam_settings = SAMSettings(variant, rho, **options)
        self._sam_clip = (gradient_clip_val, gradient_clip_algorithm)
        self._sam_drivers: dict[int, TwoPassStep] = {}

    def on_fit_start(self) -> None:
        """Build each optimizer's engine now, before the first training_step: the strategy, the optimizers and the
        variant's run-length options are checked here (a subclass that overrides this hook must call super())."""
        if not getattr(self, "automatic_optimization", True):
            for optimizer in self.trainer.optimizers:  # type: ignore[attr-defined]
                self._sam_driver_for(optimizer)
        super().on_fit_start()  # type: ignore[misc]

    @property
    def sam_engines(self) -> dict[int, SAMEngine]:
        """The engines behind :meth:`sam_step`, by optimizer index in ``trainer.optimizers`` (built at fit start)."""
        return {i: driver.engine for i, driver in sorted((self.__dict__.get("_sam_drivers") or {}).items())}

    @property
    def sam_engine(self) -> SAMEngine | None:
        """The engine of the first optimizer (None before fit start)."""
        return next(iter(self.sam_engines.values()), None)

    def _sam_driver_for(self, optimizer: Any) -> TwoPassStep:
        """The step driver of ``optimizer`` (one per optimizer, keyed by its index in ``trainer.optimizers``)."""
        if getattr(self, "automatic_optimization", True):
            raise RuntimeError(
                "sam_step needs manual optimization: set self.automatic_optimization = False in __init__ (or use "
                "lightning_sam.SAMCallback with automatic optimization)."
            )
        if "_sam_settings" not in self.__dict__:
            self.configure_sam()
        settings = self._sam_settings
        raw, trainer = getattr(optimizer, "optimizer", optimizer), self.trainer  # type: ignore[attr-defined]
        index = next((i for i, o in enumerate(trainer.optimizers) if o is raw), None)
        if index is None:
            raise RuntimeError("sam_step: the optimizer is not one of the trainer's optimizers")
        if index not in self._sam_drivers:
            check_trainer(trainer, settings.sync_ascent)
            state = (self.__dict__.get("_sam_pending_state") or {}).pop(index, None)
            driver = build_driver(trainer, self, raw, settings, "SAMMixin", automatic=False, state=state)  # type: ignore[arg-type]
            self._sam_drivers[index], self._sam_guard = driver, SecondPassGuard(self)  # type: ignore[arg-type]
            self._sam_metrics = self.__dict__.get("_sam_metrics") or StepMetrics()
        return self._sam_drivers[index]

    def on_train_epoch_end(self) -> None:
        if "_sam_metrics" in self.__dict__:  # SAM's epoch means (see lightning_sam.metrics.StepMetrics)
            self._sam_metrics.epoch_end(self)  # type: ignore[arg-type]
        super().on_train_epoch_end()  # type: ignore[misc]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        drivers = self.__dict__.get("_sam_drivers") or {}
        apart = bool(drivers) and writes_distributed_checkpoint(self.trainer)  # type: ignore[attr-defined]
        if drivers and not (apart and "optimizer_states" not in checkpoint):  # (a weights-only distributed save: none)
            entries = {}  # every rank calls this hook: per-rank state is gathered here, or written per rank (sharded)
            for index, driver in sorted(drivers.items()):
                entries[index], tensors = engine_checkpoint_state(driver.engine, tensors_apart=apart)
                put_engine_tensors(checkpoint, index, tensors)
            checkpoint[self._SAM_CHECKPOINT_KEY] = entries
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(self._SAM_CHECKPOINT_KEY)
        if state:
            trainer = getattr(self, "_trainer", None)  # None under load_from_checkpoint
            self._sam_pending_state = {i: entry_for_resume(entry, trainer, i) for i, entry in sorted(state.items())}
            self._sam_drivers = {}
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]

    def sam_step(
        self,
        loss_fn: Callable[[], Tensor],
        optimizer: Any | None = None,
        *,
        sample_loss_fn: Callable[[int, int], Tensor] | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """One whole SAM step: pass 1, ascent, pass 2, restore, clipping, ``optimizer.step()``, ``zero_grad()``.

        ``loss_fn()``: the module's loss on the current batch (forward only; called twice). ``optimizer``: by default
        ``self.optimizers()``; with several, the one to step (each has its own engine). For per-sample gradients
        (SSAM's Fisher mask): ``sample_loss_fn(i, j)``, the loss of samples ``i:j``, and ``batch_size``. Returns the
        pass-1 loss, detached."""
        if optimizer is None:
            optimizer = self.optimizers()  # type: ignore[attr-defined]
            if isinstance(optimizer, list):
                raise RuntimeError("sam_step: the module has several optimizers; pass optimizer=... explicitly")
        driver, raw = self._sam_driver_for(optimizer), getattr(optimizer, "optimizer", optimizer)
        collect_samples(driver, self, self._sam_guard, sample_loss_fn, batch_size, "SAMMixin")  # type: ignore[arg-type]
        logging = should_log(self.trainer)  # type: ignore[attr-defined]
        replay = ManualReplay(self, loss_fn, self._sam_guard)  # type: ignore[arg-type]
        loss, outcome = driver.run(raw, replay, measure=logging)
        self._sam_metrics.record(self, driver.engine, driver.precision, outcome, loss, logging)  # type: ignore[arg-type]
        clip_value, clip_algorithm = self._sam_clip
        if clip_value is not None:  # under GradScaler the gradients are still scaled here (Lightning unscales in step)
            grads, norm = gradients_of(raw), global_norm
            if driver.engine.sharded:  # DTensor gradients: clip the local shards by the norm over all of them
                params = [p for group in raw.param_groups for p in group["params"] if p.grad is not None]
                grads, norm = [local(g) for g in grads], ShardedReduction.of(params).norm
            clip_gradients_(grads, clip_value, clip_algorithm, scale=driver.precision.gradient_scale(), norm=norm)
        driver.before_optimizer_step(raw)
        optimizer.step()
        optimizer.zero_grad()
        return loss
