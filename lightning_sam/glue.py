"""Lightning glue shared by the two adapters (``SAMCallback`` and ``SAMMixin``): configuration checks, the run's
length for variant defaults, checkpoint state per rank, the optimizer's gradients and metric logging.

Nothing here runs SAM's step; it translates what the Trainer knows into what the engine and the variants need.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_sam.distributed import all_reduce_max_, rank, world_size
from lightning_sam.variants import RunLength, variant_class


# ---------------------------------------------------------------------------------------------- configuration
def check_flag(name: str, value: Any) -> bool:
    """``value`` itself when it is a real bool; a clear error otherwise (``"yes"`` or ``1`` are not accepted)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def validate_schedule(interval: int, params: Any) -> None:
    """Raise at construction for a bad ``interval`` or ``params`` filter."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be an integer >= 1 (1 = SAM on every step), got {interval!r}")
    if params is not None and params != "norm" and not callable(params):
        raise ValueError(f"params must be None, 'norm' or a callable (name, parameter) -> bool, got {params!r}")


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


def trainer_defaults(trainer: Trainer, variant: str, options: dict[str, Any]) -> dict[str, Any]:
    """The variant's options derived from the run (e.g. SSAM's refresh period), for those the user did not give.

    Raises before training when the variant needs a length this run cannot tell, naming the option to pass.
    """
    variant_cls = variant_class(variant)
    if not variant_cls.uses_run_length:
        return {}
    return variant_cls.trainer_defaults(options, run_length(trainer))


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


# ---------------------------------------------------------------------------------------------- state
def engine_state_for_this_rank(state: dict[str, Any]) -> dict[str, Any]:
    """This rank's engine state: its own when the checkpoint holds one per rank (same world size), else rank 0's."""
    per_rank = state.get("engine_per_rank")
    if per_rank and len(per_rank) == world_size():
        return per_rank[rank()]
    if per_rank:
        rank_zero_warn(
            f"The checkpoint holds per-rank SAM state for {len(per_rank)} ranks, but {world_size()} are running: "
            "every rank resumes from rank 0's state."
        )
    return state["engine"]


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


def grad_scaler_of(trainer: Trainer) -> torch.amp.GradScaler | None:
    """The GradScaler of the 16-mixed precision plugin, or None (32-true, bf16-mixed, ...)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def optimizer_grads(optimizer: Optimizer) -> list[Tensor]:
    """The gradients of the optimizer's parameters that have one."""
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def non_finite_on_any_rank(loss: Tensor) -> bool:
    """Whether ``loss`` is inf/NaN on any rank: one host sync (and a MAX all-reduce under DDP, where pass-2 losses
    are local while the gradients are shared, so that every rank takes the same decision)."""
    flag = (~torch.isfinite(loss.detach())).float().reshape(())
    if world_size() > 1:
        all_reduce_max_(flag)
    return bool(flag.item())


def skip_optimizer_step(optimizer: Optimizer, why: str, warn: Callable[[str], Any] = rank_zero_warn) -> None:
    """Make ``optimizer.step()`` leave the weights and its state untouched: drop every gradient (torch optimizers
    skip parameters without one), with a warning that says why."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
    warn(why)


# ---------------------------------------------------------------------------------------------- logging
def should_log(trainer: Trainer) -> bool:
    """Whether this step is on Lightning's logging cadence (``log_every_n_steps``)."""
    return bool(getattr(trainer._logger_connector, "should_update_logs", True))


def log_metrics(pl_module: LightningModule, values: dict[str, Tensor]) -> None:
    """Log tensors through Lightning without a host sync: per step, plus epoch means on a single process.

    Under DDP the values are rank-local and logged per step only (an epoch mean would need ``sync_dist``,
    i.e. a reduction; rank 0's values are what loggers record).
    """
    on_epoch = world_size() == 1
    for name, value in values.items():
        pl_module.log(name, value, on_step=True, on_epoch=on_epoch)
