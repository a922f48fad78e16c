"""SAM's metrics through Lightning's ``self.log``, on Lightning's logging cadence and without a host sync."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lightning_sam.distributed import world_size
from lightning_sam.engine import SAMEngine
from lightning_sam.precision import Precision
from lightning_sam.step import StepOutcome
from lightning_sam.tensor_ops import widen


def should_log(trainer: Trainer) -> bool:
    """Whether this step is on Lightning's logging cadence (``log_every_n_steps``)."""
    return bool(getattr(trainer._logger_connector, "should_update_logs", True))


class StepMetrics:
    """SAM's metrics of a fit, on Lightning's logging cadence and without a host sync.

    On the steps that log (``Trainer(log_every_n_steps=...)``): ``sam/sharpness_step`` (pass-2 loss minus pass-1
    loss), ``sam/perturbation_norm_step`` (``||e||``, measured on those steps only: it costs a pass over ``e``) and the
    variant's metrics (``<name>_step``). At the end of each epoch, on a single process: ``<name>_epoch``, the mean of
    the values recorded in the epoch (``sam/sharpness``: every SAM step whose update was not skipped; the others:
    the logging steps). Under DDP the values are rank-local and logged per step only (an epoch mean would need a
    reduction); loggers record rank 0's. On sharded parameters (FSDP2, tensor parallel) every value is global:
    norms and mask counts are reduced over the shards by the engine, and ``sam/sharpness`` is averaged over the
    ranks (``sync_dist``: one all-reduce on the logging steps), as the loss of the union batch would be.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def record(
        self,
        pl_module: LightningModule,
        engine: SAMEngine,
        precision: Precision,
        outcome: StepOutcome,
        first_loss: Tensor | None,
        logging: bool,
    ) -> None:
        """One step's values (``logging``: this step logs, see :func:`should_log`)."""
        values: dict[str, Tensor] = {}
        second_loss = outcome.second_loss
        if outcome.second_pass and not outcome.skipped and first_loss is not None and second_loss is not None:
            values["sam/sharpness"] = precision.logged_loss(widen(second_loss) - widen(first_loss))
            if logging and outcome.perturbation_norm is not None:
                values["sam/perturbation_norm"] = outcome.perturbation_norm
        if logging:
            values.update(engine.variant.metrics())
        for name, value in values.items():
            value = value.detach()
            self._sums[name] = value if name not in self._sums else self._sums[name] + value.to(self._sums[name])
            self._counts[name] = self._counts.get(name, 0) + 1
            if logging:
                sync = engine.sharded and name == "sam/sharpness"  # the others are global already
                pl_module.log(f"{name}_step", value, on_step=True, on_epoch=False, sync_dist=sync)

    def epoch_end(self, pl_module: LightningModule) -> None:
        """Log the epoch means (single process) and start a new epoch."""
        if world_size() == 1:
            for name, total in self._sums.items():
                pl_module.log(f"{name}_epoch", total / self._counts[name], on_step=False, on_epoch=True)
        self._sums.clear()
        self._counts.clear()
