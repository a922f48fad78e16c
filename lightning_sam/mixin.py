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

``sam_step(loss_fn)`` calls ``loss_fn()`` twice (pass 1 at ``w``, pass 2 at ``w + e``) and backpropagates with
``self.manual_backward`` so Lightning's precision (autocast, GradScaler) and strategy (DDP) still apply. Pass 2
runs without visible side effects (logs, torchmetrics, BatchNorm statistics), like the callback's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_sam import amp
from lightning_sam.batches import batchnorm_in_eval
from lightning_sam.clipping import clip_gradients_, validate_clipping
from lightning_sam.distributed import (
    all_reduce_max_,
    check_static_graph,
    check_strategy,
    gather_objects,
    set_gradient_sync,
    world_size,
)
from lightning_sam.engine import SAMEngine
from lightning_sam.glue import (
    check_flag,
    check_optimizer,
    engine_state_for_this_rank,
    grad_scaler_of,
    log_metrics,
    non_finite_on_any_rank,
    optimizer_grads,
    should_log,
    skip_optimizer_step,
    trainer_defaults,
    validate_schedule,
    warn_if_samples_outlast_epoch,
)
from lightning_sam.side_effects import SecondPassGuard
from lightning_sam.tensor_ops import non_finite_flag, widen
from lightning_sam.variants import make_variant, variant_class


class SAMMixin:
    """Mix into a ``LightningModule`` with ``automatic_optimization = False``; see :meth:`sam_step`."""

    _sam_config: dict[str, Any]
    _sam_guard: SecondPassGuard | None = None

    def configure_sam(
        self,
        variant: str = "sam",
        rho: float | None = None,
        *,
        sync_ascent: bool = False,
        interval: int = 1,
        params: str | Callable[[str, Tensor], bool] | None = None,
        skip_nonfinite: bool = True,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        **variant_options: Any,
    ) -> None:
        """Choose the variant (validated now) and the descent-gradient clipping. Call it in ``__init__``.

        ``sync_ascent``, ``interval``, ``params`` and ``skip_nonfinite`` as in :class:`lightning_sam.SAMCallback`;
        ``gradient_clip_val`` / ``gradient_clip_algorithm`` (``"norm"`` or ``"value"``) clip the unscaled descent
        gradient.
        """
        name = variant_class(variant).name
        make_variant(name, rho=rho, **variant_options)
        validate_clipping(gradient_clip_val, gradient_clip_algorithm)
        validate_schedule(interval, params)
        self._sam_config = {
            "variant": name,
            "rho": rho,
            "options": dict(variant_options),
            "sync_ascent": check_flag("sync_ascent", sync_ascent),
            "skip_nonfinite": check_flag("skip_nonfinite", skip_nonfinite),
            "interval": interval,
            "params": params,
            "clip_val": gradient_clip_val,
            "clip_algorithm": gradient_clip_algorithm,
        }
        self._sam_engines = {}
        self._sam_run_defaults: dict[str, Any] | None = None

    def on_fit_start(self) -> None:
        """Check the optimizers and derive the variant's run-length options now, before the first training_step
        (a run whose length the variant needs but cannot be known fails here, naming the option to pass)."""
        trainer = self.trainer  # type: ignore[attr-defined]
        if not getattr(self, "automatic_optimization", True):
            if not hasattr(self, "_sam_config"):
                self.configure_sam()
            for optimizer in trainer.optimizers:
                check_optimizer(optimizer, "SAMMixin")
            config = self._sam_config
            self._sam_run_defaults = trainer_defaults(trainer, config["variant"], config["options"])
        super().on_fit_start()  # type: ignore[misc]

    @property
    def sam_engine(self) -> SAMEngine | None:
        """The engine behind :meth:`sam_step` for the first optimizer (built on the first call)."""
        engines = getattr(self, "_sam_engines", {})
        return engines[min(engines)] if engines else None

    def _sam_engine_for(self, optimizer: Any) -> SAMEngine:
        """The engine of ``optimizer`` (one per optimizer, keyed by its index in ``trainer.optimizers``)."""
        raw = getattr(optimizer, "optimizer", optimizer)
        trainer = getattr(self, "trainer", None)
        optimizers = list(trainer.optimizers) if trainer is not None else [raw]
        index = next((i for i, o in enumerate(optimizers) if o is raw), None)
        if index is None:
            raise RuntimeError("sam_step: the optimizer is not one of the trainer's optimizers")
        engines: dict[int, SAMEngine] = self.__dict__.setdefault("_sam_engines", {})
        if index not in engines:
            engines[index] = self._sam_setup(raw)
            pending = self.__dict__.get("_sam_pending_state") or {}
            if index in pending:
                engines[index].load_state_dict(engine_state_for_this_rank(pending.pop(index)))
        return engines[index]

    def _sam_setup(self, raw: Any) -> SAMEngine:
        if getattr(self, "automatic_optimization", True):
            raise RuntimeError(
                "sam_step needs manual optimization: set self.automatic_optimization = False in __init__ "
                "(or use lightning_sam.SAMCallback with automatic optimization)."
            )
        if not hasattr(self, "_sam_config"):
            self.configure_sam()
        config = self._sam_config
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            check_strategy(trainer)
            if not config["sync_ascent"]:
                check_static_graph(trainer)
        if self._sam_guard is None:
            self._sam_guard = SecondPassGuard(self)  # type: ignore[arg-type]
        options = dict(config["options"])
        if trainer is not None:
            check_optimizer(raw, "SAMMixin")
            defaults = self.__dict__.get("_sam_run_defaults")
            if defaults is None:  # on_fit_start did not run (a subclass that overrides it without super())
                defaults = trainer_defaults(trainer, config["variant"], options)
            options = {**defaults, **options}
        engine = SAMEngine.from_optimizer(
            raw,
            self,  # type: ignore[arg-type]
            config["variant"],
            config["rho"],
            select=config.get("params"),
            interval=config.get("interval", 1),
            **options,
        )
        message = getattr(engine.variant, "setup_message", None)
        if message:
            rank_zero_info(f"SAMMixin: {message}")
        return engine

    # Variant state travels in the checkpoint under this key, one entry per optimizer index. A subclass that
    # overrides these hooks must call super() (they are cooperative, like every LightningModule hook).
    _SAM_CHECKPOINT_KEY = "lightning_sam.SAMMixin"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        engines = getattr(self, "_sam_engines", {})
        state: dict[int, Any] = {}
        for i, engine in engines.items():
            entry = {"engine": engine.state_dict()}
            if engine.variant.per_rank_state and world_size() > 1:  # every rank calls this hook: gather
                entry["engine_per_rank"] = gather_objects(entry["engine"])
            state[i] = entry
        if state:
            checkpoint[self._SAM_CHECKPOINT_KEY] = state
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(self._SAM_CHECKPOINT_KEY)
        if state:
            self._sam_pending_state = dict(state)
            self._sam_engines = {}
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

        Args:
            loss_fn: computes the module's loss on the current batch (forward only; called twice).
            optimizer: defaults to ``self.optimizers()`` (there must be one then). With several optimizers, pass
                the one to step; each gets its own engine (and variant state).
            sample_loss_fn: for variants that need per-sample gradients (SSAM's Fisher mask): returns the loss
                of samples ``i:j`` of the current batch as ``sample_loss_fn(i, j)``. It runs with BatchNorm on
                running statistics and no visible side effects.
            batch_size: the number of samples in the current batch (with ``sample_loss_fn``).

        Returns:
            The pass-1 loss, detached.
        """
        if optimizer is None:
            optimizer = self.optimizers()  # type: ignore[attr-defined]
            if isinstance(optimizer, list):
                raise RuntimeError("sam_step: the module has several optimizers; pass optimizer=... explicitly")
        engine = self._sam_engine_for(optimizer)
        if engine.samples_needed():
            if sample_loss_fn is None or batch_size is None:
                raise RuntimeError(
                    f"variant {engine.variant.name!r} needs per-sample gradients this step (SSAM's Fisher mask): "
                    "call self.sam_step(loss_fn, sample_loss_fn=lambda i, j: <loss of samples i:j>, "
                    "batch_size=<samples in the batch>), or use SSAM with mask='dst'."
                )
            assert self._sam_guard is not None
            if engine.step_count == 0 and not self.__dict__.get("_sam_samples_warned"):
                self._sam_samples_warned = True
                wanted = engine.samples_needed()
                trainer = self.trainer  # type: ignore[attr-defined]
                warn_if_samples_outlast_epoch(trainer, engine.variant.name, wanted, batch_size, "SAMMixin")
            with self._sam_guard.active(), batchnorm_in_eval(self):  # type: ignore[arg-type]
                engine.collect_samples(sample_loss_fn, batch_size)
        config = self._sam_config
        trainer = self.trainer  # type: ignore[attr-defined]
        raw = getattr(optimizer, "optimizer", optimizer)
        scaler = grad_scaler_of(trainer)
        second = engine.needs_second_pass()

        set_gradient_sync(trainer, config["sync_ascent"] or not second)
        loss1 = loss_fn()
        self.manual_backward(loss1)  # type: ignore[attr-defined]
        set_gradient_sync(trainer, True)
        run_second = second
        if scaler is not None and second:
            found = amp.unscale_(optimizer_grads(raw), scaler)  # pass-1 grads: discarded after the ascent
            if world_size() > 1 and not config["sync_ascent"]:
                all_reduce_max_(found)
            if found.item():  # one host sync, only under GradScaler (it syncs here anyway)
                run_second = False
                amp.poison_(optimizer_grads(raw))  # the scaler's unscale_ in step() then skips on every rank
        if run_second:
            perturbation_norm = engine.ascend()
            guard = self._sam_guard
            assert guard is not None

            def probe() -> Tensor:  # forward-only loss at the current weights (XSAM's alpha search)
                with torch.no_grad(), guard.active():
                    return loss_fn().detach()

            try:
                for ascent in range(engine.ascent_steps):  # k passes at perturbed weights; only the last syncs
                    last = ascent == engine.ascent_steps - 1
                    if ascent:
                        engine.ascend()
                    torch._foreach_zero_(optimizer_grads(raw))
                    set_gradient_sync(trainer, last)
                    with guard.active():
                        loss2 = loss_fn()
                        self.manual_backward(loss2)  # type: ignore[attr-defined]
                engine.descend(evaluate=probe)
            finally:
                engine.restore()
                set_gradient_sync(trainer, True)
            if scaler is not None:  # GradScaler skips a non-finite step itself (one host sync; it syncs anyway)
                skipped = bool(non_finite_flag(optimizer_grads(raw)).item())
            else:
                skipped = config.get("skip_nonfinite", True) and non_finite_on_any_rank(loss2)
            if skipped and scaler is None:
                skip_optimizer_step(
                    raw,
                    f"SAMMixin: the loss at the perturbed weights is not finite at global step {trainer.global_step}: "
                    "this optimizer step is skipped (weights and optimizer state unchanged). If it repeats, lower rho "
                    "or the learning rate (configure_sam(skip_nonfinite=False) lets the step through).",
                )  # optimizer.step() below still runs, without gradients: Lightning counts the step, nothing moves
            if perturbation_norm is not None and not skipped:  # a skipped step's values stay out of the metrics
                sharpness = widen(loss2.detach()) - widen(loss1.detach())
                metrics = {"sam/sharpness": sharpness, "sam/perturbation_norm": perturbation_norm}
                log_metrics(self, metrics)  # type: ignore[arg-type]
        else:
            engine.plain_step()
        if should_log(trainer):
            log_metrics(self, engine.variant.metrics())  # type: ignore[arg-type]
        if config["clip_val"] is not None:
            # under GradScaler the descent gradient is still scaled here (Lightning unscales inside step)
            scale = scaler._scale if scaler is not None else None
            clip_gradients_(optimizer_grads(raw), config["clip_val"], config["clip_algorithm"], scale=scale)
        if engine.has_before_step:  # gradients may still be scaled here: the hook compares and tests them only
            grads = optimizer_grads(raw)
            skip = non_finite_flag(grads) if scaler is not None and grads else None
            engine.before_optimizer_step(raw, skip)
        optimizer.step()
        optimizer.zero_grad()
        return loss1.detach()
