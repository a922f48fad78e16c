"""SAMCallback: SAM and its variants for any LightningModule with automatic optimization.

How a step runs (Lightning 2.6, automatic optimization)::

    on_train_batch_start      keep the (micro-)batch; switch DDP's gradient sync off for a local pass 1
    training_step + backward  Lightning's own closure: pass 1 -> g (all micro-batches of the window)
    on_before_optimizer_step  (here) ascend w <- w + e; pass 2: training_step + backward at w + e on the same
                              batches through trainer.strategy (DDP all-reduce, autocast, GradScaler);
                              unscale pass 2 (16-mixed); descent gradient; restore w bit-exactly
    gradient clipping         Lightning's, on the unscaled descent gradient
    optimizer.step()          the user's optimizer, untouched

Pass 2 has no side effect the user can see: ``self.log`` calls are not recorded again, torchmetrics states
and BatchNorm running statistics are as pass 1 left them (see :mod:`lightning_sam.side_effects`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor
from torch.optim import Optimizer

from lightning_sam import amp
from lightning_sam.batches import batch_size_of, batchnorm_in_eval, slice_batch
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
    loss_from_output,
    non_finite_on_any_rank,
    optimizer_grads,
    should_log,
    skip_optimizer_step,
    trainer_defaults,
    validate_schedule,
    warn_if_samples_outlast_epoch,
)
from lightning_sam.side_effects import SecondPassGuard
from lightning_sam.tensor_ops import widen
from lightning_sam.variants import make_variant, variant_class


class SAMCallback(Callback):
    """Train any automatic-optimization LightningModule with SAM or one of its variants. No module changes.

    Args:
        variant: one of :func:`lightning_sam.available_variants` (``"sam"``, ``"asam"``, ...).
        rho: neighbourhood radius; ``None`` takes the variant's default (SAM 0.05, ASAM 0.5).
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
        **variant_options: the variant's options, named as on the variant's docs page (ASAM: ``eta``).

    Example::

        trainer = Trainer(callbacks=[SAMCallback(variant="asam", rho=0.5)])

    Logged each step through Lightning: ``sam/sharpness`` (pass-2 loss minus pass-1 loss) and
    ``sam/perturbation_norm`` (``||e||``). A ``training_step`` returning None skips SAM for that step.
    ``on_before_backward`` / ``on_after_backward`` fire in both passes; :func:`lightning_sam.in_second_pass`
    tells them (and ``training_step``) which one is running.
    """

    def __init__(
        self,
        variant: str = "sam",
        rho: float | None = None,
        *,
        sync_ascent: bool = False,
        interval: int = 1,
        params: str | Callable[[str, Tensor], bool] | None = None,
        skip_nonfinite: bool = True,
        # The variants' options, spelled out so that LightningCLI/jsonargparse can configure them from YAML as
        # flat keys beside `variant` and `rho`. None = the variant's default; an option the chosen variant does
        # not have raises. tests/test_cli.py checks that this list covers every registered variant's options.
        eta: float | None = None,
        sparsity: float | None = None,
        mask: str | None = None,
        pattern: str | None = None,
        n: int | None = None,
        m: int | None = None,
        num_samples: int | None = None,
        fisher_batch_size: int | None = None,
        mask_every: int | None = None,
        drop_rate: float | None = None,
        seed: int | None = None,
        total_steps: int | None = None,
        sigma: float | None = None,
        lmbda: float | None = None,
        adaptive: bool | None = None,
        steps: int | None = None,
        rho_max: float | None = None,
        alpha: float | None = None,
        alpha_max: float | None = None,
        alpha_step: float | None = None,
        alpha_every: int | None = None,
        k: int | None = None,
        mu0: float | None = None,
        schedule: str | None = None,
        rule: str | None = None,
        pairs: Any = None,
        **variant_options: Any,
    ) -> None:
        super().__init__()
        explicit = {
            "eta": eta,
            "sparsity": sparsity,
            "mask": mask,
            "pattern": pattern,
            "n": n,
            "m": m,
            "num_samples": num_samples,
            "fisher_batch_size": fisher_batch_size,
            "mask_every": mask_every,
            "drop_rate": drop_rate,
            "seed": seed,
            "total_steps": total_steps,
            "sigma": sigma,
            "lmbda": lmbda,
            "adaptive": adaptive,
            "steps": steps,
            "rho_max": rho_max,
            "alpha": alpha,
            "alpha_max": alpha_max,
            "alpha_step": alpha_step,
            "alpha_every": alpha_every,
            "k": k,
            "mu0": mu0,
            "schedule": schedule,
            "rule": rule,
            "pairs": pairs,
        }
        variant_options = {**{key: v for key, v in explicit.items() if v is not None}, **variant_options}
        self.variant = variant_class(variant).name
        make_variant(self.variant, rho=rho, **variant_options)  # validate everything now, not in training
        validate_schedule(interval, params)
        self.rho = rho
        self.variant_options = dict(variant_options)
        self.sync_ascent = check_flag("sync_ascent", sync_ascent)
        self.skip_nonfinite = check_flag("skip_nonfinite", skip_nonfinite)
        self.interval = interval
        self.params = params
        self.engine: SAMEngine | None = None
        self._pending_state: dict[str, Any] | None = None
        self._guard: SecondPassGuard | None = None
        self._window: list[tuple[Any, int]] = []  # the micro-batches of this step whose pass 1 produced a loss
        self._window_open = False  # a micro-batch of the coming optimizer step has started
        self._current: tuple[Any, int] | None = None  # the micro-batch running now
        self._loss1: Tensor | None = None
        self._loss2: Tensor | None = None
        self._second_pass_planned = True
        self._in_second_pass = False
        self._samples_warned = False

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(variant=self.variant)

    @property
    def in_second_pass(self) -> bool:
        """True while this callback re-runs ``training_step`` at the perturbed weights."""
        return self._in_second_pass

    def state_dict(self) -> dict[str, Any]:
        if self.engine is None:
            return dict(self._pending_state or {})
        state = self.engine.state_dict()
        if self.engine.variant.per_rank_state and world_size() > 1:
            # Lightning writes rank 0's callback state only; gather every rank's (checkpoints are collective)
            return {"engine": state, "engine_per_rank": gather_objects(state)}
        return {"engine": state}

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
        check_strategy(trainer)
        if not self.sync_ascent:
            check_static_graph(trainer)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise RuntimeError(
                f"SAMCallback needs exactly one optimizer, found {len(trainer.optimizers)}. Put all parameters in "
                "one optimizer (param groups may carry their own 'sam_rho' or 'sam_exclude=True')."
            )
        check_optimizer(trainer.optimizers[0], "SAMCallback")
        options = {**trainer_defaults(trainer, self.variant, self.variant_options), **self.variant_options}
        self.engine = SAMEngine.from_optimizer(
            trainer.optimizers[0],
            pl_module,
            self.variant,
            self.rho,
            select=self.params,
            interval=self.interval,
            **options,
        )
        if self._pending_state:
            self.engine.load_state_dict(engine_state_for_this_rank(self._pending_state))
            self._pending_state = None
        whole = getattr(self.engine.variant, "fully_perturbed", None)
        if whole:
            rank_zero_info(f"SAMCallback: these tensors cannot take the N:M pattern and are perturbed whole: {whole}")
        message = getattr(self.engine.variant, "setup_message", None)
        if message:
            rank_zero_info(f"SAMCallback: {message}")
        self._guard = SecondPassGuard(pl_module)
        self._window, self._window_open = [], False

    # ------------------------------------------------------------------ pass 1
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._window, self._window_open = [], False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.engine is not None
        if self.engine.samples_needed():
            if self.engine.step_count == 0 and not self._samples_warned:
                self._samples_warned = True
                wanted, size = self.engine.samples_needed(), batch_size_of(batch)
                warn_if_samples_outlast_epoch(trainer, self.variant, wanted, size, "SAMCallback")
            self._collect_samples(trainer, pl_module, batch, batch_idx)
        if not self._window_open:  # the first micro-batch of an optimizer step
            self._window_open = True
            self._second_pass_planned = self.engine.needs_second_pass()
            self._loss1 = None
        self._current = (batch, batch_idx)
        # A step with pass 2 ascends with the local gradient; a step without one descends on pass 1's gradient,
        # which must then be all-reduced.
        set_gradient_sync(trainer, self.sync_ascent or not self._second_pass_planned)

    def _collect_samples(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Per-sample gradients of this batch for the variant (SSAM's Fisher), with no visible side effect.

        ``training_step`` runs on slices of the batch, directly on the LightningModule (not through DDP: these
        passes are local and only their squared gradients are summed over ranks), in fp32, with BatchNorm on its
        running statistics; logs, metrics and buffers are restored as for pass 2.
        """
        assert self.engine is not None and self._guard is not None
        pass_batch_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)

        def loss_of_slice(start: int, stop: int) -> Tensor:
            piece = slice_batch(batch, start, stop)
            loss = loss_from_output(pl_module.training_step(*((piece, batch_idx) if pass_batch_idx else (piece,))))
            if loss is None:
                raise RuntimeError("training_step returned None on a slice of the batch during SSAM's Fisher pass")
            return loss

        self._in_second_pass = True
        try:
            with self._guard.active(), batchnorm_in_eval(pl_module):
                self.engine.collect_samples(loss_of_slice, batch_size_of(batch))
        finally:
            self._in_second_pass = False

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        value = loss.detach()
        if self._in_second_pass:
            self._loss2 = value if self._loss2 is None else self._loss2 + value
        else:  # pass 2 replays exactly the micro-batches that reached backward in pass 1
            self._loss1 = value if self._loss1 is None else self._loss1 + value
            if self._current is not None:
                self._window.append(self._current)

    # ------------------------------------------------------------------ pass 2
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        window, self._window = self._window, []
        opened, self._window_open = self._window_open, False
        engine = self.engine
        assert engine is not None and self._guard is not None
        if not opened:
            raise RuntimeError(
                f"{type(optimizer).__name__}.step evaluated its closure more than once in one optimizer step (a line "
                "search?): SAMCallback perturbs the weights once per step and supports optimizers that evaluate the "
                "closure once (SGD, Adam, AdamW, ...)."
            )
        if not window:  # training_step returned None for every micro-batch: no backward, no SAM this step
            engine.plain_step()  # Lightning still counts the optimizer step: keep the schedules aligned
            return
        scaler = grad_scaler_of(trainer)
        if not self._second_pass_planned:
            engine.plain_step()
            self._before_step(trainer, pl_module, optimizer, scaler)
            return
        if scaler is not None and self._pass1_overflowed(scaler, optimizer):
            engine.plain_step()  # GradScaler skips this step and lowers the scale once
            self._before_step(trainer, pl_module, optimizer, scaler)
            return
        perturbation_norm = engine.ascend()
        if perturbation_norm is None:
            return
        try:
            passes = engine.ascent_steps  # k passes at perturbed weights; only the last one all-reduces
            for index in range(passes):
                if index:  # multi-step variants ascend again from the previous pass's local gradient
                    if scaler is not None:  # an overflow here skips the step (the weights are restored anyway)
                        found = amp.unscale_(optimizer_grads(optimizer), scaler)
                        if not amp.handles_unscaling(optimizer):
                            amp.mark_found_inf(scaler, optimizer, found)
                    engine.ascend()
                self._loss2 = None
                torch._foreach_zero_(optimizer_grads(optimizer))
                self._run_second_pass(trainer, pl_module, optimizer, window, sync=index == passes - 1)
            if scaler is not None and not amp.handles_unscaling(optimizer):
                amp.unscale_second_pass_(scaler, optimizer)
            engine.descend(evaluate=lambda: self._probe_loss(trainer, pl_module, window))
        finally:
            engine.restore()
            self._in_second_pass = False
            set_gradient_sync(trainer, True)
        skipped = self._skip_non_finite(trainer, optimizer, scaler)
        self._before_step(trainer, pl_module, optimizer, scaler)
        if not skipped:  # a skipped step's sharpness (inf) must not enter the epoch means
            self._log(pl_module, scaler, perturbation_norm)

    def _skip_non_finite(self, trainer: Trainer, optimizer: Optimizer, scaler: torch.amp.GradScaler | None) -> bool:
        """Whether this step's update is skipped for a non-finite pass (GradScaler's own skip under 16-mixed; else
        ``skip_nonfinite`` on an inf/NaN pass-2 loss). One host sync either way (GradScaler syncs here anyway)."""
        if scaler is not None:
            return bool(amp.step_will_be_skipped(scaler, optimizer, optimizer_grads(optimizer)).item())
        if not self.skip_nonfinite or self._loss2 is None or not non_finite_on_any_rank(self._loss2):
            return False
        skip_optimizer_step(
            optimizer,
            f"SAMCallback: the loss at the perturbed weights is not finite at global step {trainer.global_step}: this "
            "optimizer step is skipped (weights and optimizer state unchanged). If it repeats, lower rho or the "
            "learning rate (skip_nonfinite=False lets the step through).",
        )
        return True

    def _before_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer, scaler: torch.amp.GradScaler | None
    ) -> None:
        """The variant's pre-step hook (BAR) and its metrics, on Lightning's logging cadence."""
        assert self.engine is not None
        if self.engine.has_before_step:
            skip = amp.step_will_be_skipped(scaler, optimizer, optimizer_grads(optimizer)) if scaler else None
            self.engine.before_optimizer_step(optimizer, skip)
        if should_log(trainer):
            log_metrics(pl_module, self.engine.variant.metrics())

    def _pass1_overflowed(self, scaler: torch.amp.GradScaler, optimizer: Optimizer) -> bool:
        """Whether pass 1 had an inf/NaN on any rank (one host sync; GradScaler syncs here anyway)."""
        if amp.handles_unscaling(optimizer):
            # Lightning did not unscale (the optimizer will, inside step): check and unscale pass 1 here. The
            # gradients are discarded after the ascent, and an inf survives unscaling, so scaler.step still skips.
            found = amp.unscale_(optimizer_grads(optimizer), scaler)
        else:
            registered = amp.registered_found_inf(scaler, optimizer)
            if registered is None:
                return False
            found = registered.clone()
        if world_size() > 1 and not self.sync_ascent:
            all_reduce_max_(found)  # all ranks skip pass 2 together, or none does (else pass 2 deadlocks)
        overflowed = bool(found.item())
        if overflowed:  # make sure GradScaler skips on this rank too (another rank may be the one that overflowed)
            if amp.handles_unscaling(optimizer):
                amp.poison_(optimizer_grads(optimizer))  # scaler.step checks the grads itself
            else:
                amp.mark_found_inf(scaler, optimizer, found)
        return overflowed

    def _probe_loss(self, trainer: Trainer, pl_module: LightningModule, window: list[tuple[Any, int]]) -> Tensor:
        """The window's loss at the current weights: forward only, in training mode, without side effects."""
        assert self._guard is not None
        pass_batch_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)
        total: Tensor | None = None
        self._in_second_pass = True
        with torch.no_grad(), self._guard.active(), trainer.precision_plugin.train_step_context():
            for batch, batch_idx in window:
                loss = loss_from_output(pl_module.training_step(*((batch, batch_idx) if pass_batch_idx else (batch,))))
                if loss is None:
                    raise RuntimeError("training_step returned None during a loss probe")
                value = widen(loss.detach()) / trainer.accumulate_grad_batches
                total = value if total is None else total + value
        assert total is not None
        return total

    def _run_second_pass(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        optimizer: Optimizer,
        window: list[tuple[Any, int]],
        sync: bool = True,
    ) -> None:
        """Re-run training_step + backward at the perturbed weights on every micro-batch of the window, without
        side effects; with ``sync``, DDP all-reduces on the last micro-batch."""
        assert self._guard is not None
        pass_batch_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)
        accumulate = trainer.accumulate_grad_batches
        self._in_second_pass = True
        with self._guard.active():
            for i, (batch, batch_idx) in enumerate(window):
                set_gradient_sync(trainer, sync and i == len(window) - 1)
                args = (batch, batch_idx) if pass_batch_idx else (batch,)
                loss = loss_from_output(trainer.strategy.training_step(*args))
                if loss is None:
                    raise RuntimeError(
                        "training_step returned None in SAM's second pass although it returned a loss in the first; "
                        "skip batches deterministically (the same way in both passes)."
                    )
                trainer.strategy.backward(loss / accumulate, optimizer)

    def _log(self, pl_module: LightningModule, scaler: torch.amp.GradScaler | None, perturbation_norm: Tensor) -> None:
        if self._loss1 is None or self._loss2 is None:
            return
        sharpness = widen(self._loss2) - widen(self._loss1)
        if scaler is not None:  # the losses seen by on_before_backward were scaled
            sharpness = sharpness * amp.inverse_scale(scaler).to(sharpness.device)
        log_metrics(pl_module, {"sam/sharpness": sharpness, "sam/perturbation_norm": perturbation_norm})

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
        options = "".join(
            f", {k}=<{len(v)} items>" if isinstance(v, (list, tuple)) else f", {k}={v!r}"
            for k, v in self.variant_options.items()
        )
        return f"SAMCallback(variant={self.variant!r}, rho={self.rho!r}, sync_ascent={self.sync_ascent}{options})"
