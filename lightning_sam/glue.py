"""Lightning glue shared by the two adapters (``SAMCallback`` and ``SAMMixin``): the trainer checks, the variant
configured for this run (its run-length defaults), the step driver of a fit (engine and precision), and the per-sample
passes (checkpoint state: :mod:`lightning_sam.checkpointing`).

Nothing here runs SAM's step (that is :mod:`lightning_sam.step`); it translates what the Trainer knows into what the
engine and the variants need. Lightning's private attributes are touched only in :mod:`lightning_sam.metrics`
(``trainer._logger_connector``) and :mod:`lightning_sam.strategies` (``strategy._ddp_kwargs``,
``strategy._save_distributed_checkpoint``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_sam.batches import batchnorm_in_eval
from lightning_sam.checkpointing import state_for_engine
from lightning_sam.engine import SAMEngine
from lightning_sam.precision import GradScaling, NoScaling, Precision
from lightning_sam.settings import SAMSettings
from lightning_sam.side_effects import SecondPassGuard
from lightning_sam.step import TwoPassStep
from lightning_sam.strategies import check_static_graph, check_strategy, resolve_sync_ascent
from lightning_sam.variants import RunLength, Variant, variant_info


# ---------------------------------------------------------------------------------------------- configuration
def check_optimizer(optimizer: Optimizer, adapter: str) -> None:
    """Reject optimizers whose ``step`` evaluates the closure several times (SAM perturbs once per step)."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            f"{adapter} does not support torch.optim.LBFGS: it evaluates the closure several times per step (line "
            "search), while SAM's perturbation is defined for the one gradient of a step. Use a first-order "
            "optimizer (SGD, Adam, AdamW, ...)."
        )


# ---------------------------------------------------------------------------------------------- run length
def run_length(trainer: Trainer) -> RunLength:
    """The epoch and run lengths in optimizer steps, from the loaded train dataloader and the Trainer's limits.

    Epoch: ``ceil(num_training_batches / accumulate_grad_batches)`` (``limit_train_batches`` included). Run:
    ``max_steps`` or ``max_epochs`` epochs, whichever ends the run first. Loads the train dataloader if the Trainer
    has not yet (as ``trainer.estimated_stepping_batches`` does, which skips it when only ``max_steps`` is set).
    """
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    epoch: int | None = None
    why_no_epoch = "the epoch length is unknown"
    if not math.isfinite(batches):
        why_no_epoch = (
            "the train dataloader has no length (e.g. an IterableDataset without __len__; "
            "Trainer(limit_train_batches=<int>) also fixes the epoch length)"
        )
    elif batches <= 0:
        why_no_epoch = "the train dataloader has no batches"
    else:
        epoch = math.ceil(batches / trainer.accumulate_grad_batches)
    limits = []
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        limits.append(trainer.max_steps)
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and epoch is not None:
        limits.append(epoch * max(max_epochs, 1))
    if limits:
        why_no_total = ""
    elif max_epochs is not None and max_epochs >= 0:
        why_no_total = f"max_epochs={max_epochs} does not tell the number of steps: {why_no_epoch}"
    else:
        why_no_total = "the Trainer sets neither max_steps nor max_epochs (max_time or an endless run)"
    return RunLength(epoch, min(limits) if limits else None, why_no_epoch, why_no_total or "the run length is unknown")


def variant_for_run(trainer: Trainer, spec: Variant) -> Variant:
    """A fresh variant built from ``spec``'s options plus those it derives from this run (e.g. SSAM's refresh period
    from the epoch length), for the options the user did not give.

    Raises before training when the variant needs a length this run cannot tell, naming the option to pass.
    """
    if not variant_info(spec).run_length:
        return spec.with_options()
    return spec.with_options(**type(spec).run_defaults(spec.config, run_length(trainer)))


def check_trainer(trainer: Trainer, sync_ascent: bool | None) -> None:
    """The strategy checks both adapters run before training."""
    check_strategy(trainer)
    if not resolve_sync_ascent(trainer, sync_ascent):
        check_static_graph(trainer)


def build_driver(
    trainer: Trainer,
    module: LightningModule,
    optimizer: Optimizer,
    settings: SAMSettings,
    adapter: str,
    *,
    automatic: bool,
    state: dict[str, Any] | None = None,
) -> TwoPassStep:
    """The step driver of ``optimizer`` for this fit: its engine (the variant configured for the run, ``state`` from
    a checkpoint loaded) and its precision object; logs the variant's setup line."""
    check_optimizer(optimizer, adapter)
    engine = SAMEngine.from_optimizer(
        optimizer, module, variant_for_run(trainer, settings.spec), **settings.engine_options
    )
    if engine.sharded:  # the ranks whose batches differ: SSAM's Fisher sums add up over them
        mesh = getattr(trainer.strategy, "device_mesh", None)
        if mesh is not None and "data_parallel" in (mesh.mesh_dim_names or ()):
            engine.data_parallel_group = mesh["data_parallel"].get_group()
    if state:
        engine.load_state_dict(state_for_engine(state, engine))
    if engine.variant.setup_message:
        rank_zero_info(f"{adapter}: {engine.variant.setup_message}")
    sync_ascent = resolve_sync_ascent(trainer, settings.sync_ascent)
    precision = precision_for(trainer, optimizer, automatic=automatic, settings=settings, adapter=adapter)
    return TwoPassStep(engine, precision, sync_ascent=sync_ascent)


def collect_samples(
    driver: TwoPassStep,
    module: LightningModule,
    guard: SecondPassGuard,
    loss_of_slice: Callable[[int, int], Tensor] | None,
    batch_size: int | None,
    adapter: str,
) -> None:
    """Per-sample gradients for the variant (SSAM's Fisher) with no visible side effect: BatchNorm on its running
    statistics, logs/metrics/buffers restored. At the first collection of a run, warn when it will take the whole
    first epoch. Nothing to do when the variant wants no samples this step."""
    if not driver.engine.samples_needed():
        return
    if loss_of_slice is None or batch_size is None:
        raise RuntimeError(
            f"variant {driver.engine.variant.name!r} needs per-sample gradients this step (SSAM's Fisher mask): call "
            "self.sam_step(loss_fn, sample_loss_fn=lambda i, j: <loss of samples i:j>, batch_size=<samples in the "
            "batch>), or use SSAM with mask='dst'."
        )
    if driver.collections == 0 and driver.engine.step_count == 0:
        engine = driver.engine
        warn_if_samples_outlast_epoch(module.trainer, engine.variant.name, engine.samples_needed(), batch_size, adapter)
    with guard.active(), batchnorm_in_eval(module):
        driver.collect_samples(loss_of_slice, batch_size)


def precision_for(
    trainer: Trainer, optimizer: Optimizer, *, automatic: bool, settings: SAMSettings, adapter: str
) -> Precision:
    """The precision object of a fit: GradScaling under 16-mixed, else NoScaling (with the non-finite check)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        across_ranks = not resolve_sync_ascent(trainer, settings.sync_ascent)
        return GradScaling(scaler, optimizer, unscaled_by_caller=automatic, across_ranks=across_ranks)
    return NoScaling(skip_nonfinite=settings.skip_nonfinite, adapter=adapter, warn=rank_zero_warn)


def warn_if_samples_outlast_epoch(trainer: Trainer, variant: str, wanted: int, batch_size: int, adapter: str) -> None:
    """Call at the first batch of a run that collects samples (SSAM's Fisher mask): warn when collecting ``wanted``
    samples takes the whole first epoch, which then trains without a single SAM step."""
    epoch = trainer.num_training_batches
    batches = math.ceil(wanted / max(1, batch_size))
    if math.isfinite(epoch) and batches >= epoch:
        rank_zero_warn(
            f"{adapter}: variant {variant!r} collects {wanted} training samples for its first mask before its first "
            f"SAM step: {batches} batches of {batch_size}, but an epoch has {int(epoch)} batches, so the whole first "
            "epoch trains without SAM. Pass a smaller num_samples=... (or mask='dst', which needs no samples)."
        )


# ---------------------------------------------------------------------------------------------- the step
def loss_from_output(output: Any) -> Tensor | None:
    """The loss in a ``training_step`` output: the tensor itself, ``output["loss"]``, or None."""
    if output is None:
        return None
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if "loss" not in output:
            raise RuntimeError("training_step returned a dict without a 'loss' key; SAM needs the loss to re-run it")
        return output["loss"]
    raise RuntimeError(f"training_step returned a {type(output).__name__}; expected a Tensor, a dict or None")
