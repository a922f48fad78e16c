"""What SAM needs from Lightning's strategies: DDP's gradient-sync switch and the checks that reject strategies SAM
cannot run under.

Pass 1 runs without DDP's gradient all-reduce by default (each rank ascends with its own gradient: the paper's
m-sharpness, half the communication); pass 2 all-reduces as usual, so every rank descends with the same gradient and
the replicas stay bit-identical. DDP reads ``require_backward_grad_sync`` in ``forward``, and Lightning's own
``no_sync`` (gradient accumulation) saves and restores it, so setting it before pass 1 is enough.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from torch.nn.parallel import DistributedDataParallel


def ddp_module(trainer: Trainer) -> DistributedDataParallel | None:
    """The DDP wrapper around the LightningModule, if the strategy uses one."""
    model = getattr(trainer.strategy, "model", None)
    return model if isinstance(model, DistributedDataParallel) else None


def set_gradient_sync(trainer: Trainer, enabled: bool) -> None:
    """Switch DDP's gradient all-reduce for the next forward/backward (no-op without DDP)."""
    model = ddp_module(trainer)
    if model is not None:
        model.require_backward_grad_sync = enabled


def check_strategy(trainer: Trainer) -> None:
    """Raise a clear error for strategies SAM cannot run under (called from ``setup``)."""
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )

    strategy = trainer.strategy
    name = type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy):
        raise RuntimeError(
            "lightning_sam does not support DeepSpeed: DeepSpeed owns the optimizer step and the gradients, so "
            "SAM's second pass cannot run between backward and step. Use strategy='ddp' (or 'ddp_spawn')."
        )
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        raise RuntimeError(
            f"lightning_sam does not support {name} yet: parameters and gradients are sharded, so the global "
            "gradient norm and the saved copy would need a reduction over shards. Use strategy='ddp' "
            "(DistributedDataParallel replicates the model and is fully supported)."
        )
    if "XLA" in name:
        raise RuntimeError(f"lightning_sam has not been built or tested for {name} (XLA/TPU). Use strategy='ddp'.")
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise RuntimeError(
            f"lightning_sam supports the single-device and DDP strategies (ddp, ddp_spawn, "
            f"ddp_find_unused_parameters_true, multi-node DDP); got {name}. Use strategy='ddp'."
        )


def check_static_graph(trainer: Trainer) -> None:
    """DDP's ``static_graph=True`` crashes when an iteration skips the gradient sync; reject it clearly."""
    model = ddp_module(trainer)
    static = bool(getattr(model, "static_graph", False)) or bool(
        getattr(trainer.strategy, "_ddp_kwargs", {}).get("static_graph", False)
    )
    if static:
        raise RuntimeError(
            "SAM with a local pass 1 cannot run under DDP(static_graph=True): DDP's static graph requires every "
            "iteration to all-reduce. Drop static_graph=True, or pass sync_ascent=True (SAMCallback(..., "
            "sync_ascent=True) or self.configure_sam(..., sync_ascent=True)) so both passes all-reduce."
        )
