"""What SAM needs from Lightning's strategies: DDP's gradient-sync switch, ``sync_ascent`` per strategy and the checks
that reject strategies SAM cannot run under.

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
    if isinstance(strategy, FSDPStrategy):
        raise RuntimeError(
            "lightning_sam does not support FSDPStrategy (FSDP1, flat parameters): use "
            "strategy=ModelParallelStrategy(data_parallel_size=..., tensor_parallel_size=1) and apply "
            "torch.distributed.fsdp.fully_shard in configure_model (FSDP2: per-parameter DTensor shards, which SAM "
            "perturbs in place), or strategy='ddp'."
        )
    if isinstance(strategy, ModelParallelStrategy):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            raise RuntimeError(
                "lightning_sam under ModelParallelStrategy supports precision '32-true', 'bf16-mixed' and "
                "'bf16-true', not '16-mixed': a GradScaler's overflow check would see only this rank's gradient "
                "shards. Use 'bf16-mixed'."
            )
        return
    if "XLA" in name:
        raise RuntimeError(f"lightning_sam has not been built or tested for {name} (XLA/TPU). Use strategy='ddp'.")
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise RuntimeError(
            f"lightning_sam supports the single-device, DDP (ddp, ddp_spawn, ddp_find_unused_parameters_true, "
            f"multi-node DDP) and ModelParallelStrategy (FSDP2, tensor parallel) strategies; got {name}. Use "
            "strategy='ddp'."
        )


def is_sharded_strategy(trainer: Trainer) -> bool:
    """Whether the strategy shards parameters (``ModelParallelStrategy``: FSDP2 and/or tensor parallel)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(trainer.strategy, ModelParallelStrategy)


def writes_distributed_checkpoint(trainer: Trainer) -> bool:
    """Whether the strategy saves a distributed checkpoint (``ModelParallelStrategy``, unless built with
    ``save_distributed_checkpoint=False``): the optimizer states are written per rank, the rest by rank 0."""
    return is_sharded_strategy(trainer) and bool(getattr(trainer.strategy, "_save_distributed_checkpoint", True))


def resolve_sync_ascent(trainer: Trainer, sync_ascent: bool | None) -> bool:
    """The ``sync_ascent`` a fit runs with: under DDP, the user's choice (default False: local pass 1); under
    ModelParallelStrategy always True, since FSDP reduce-scatters every backward (pass 1 is the global gradient);
    an explicit ``False`` there cannot be honoured and raises."""
    if not is_sharded_strategy(trainer):
        return bool(sync_ascent)
    if sync_ascent is False:
        raise ValueError(
            "sync_ascent=False (a local pass 1 per rank) cannot be honoured under ModelParallelStrategy: FSDP "
            "reduce-scatters the gradient of every backward, so pass 1 is always the global gradient. Leave "
            "sync_ascent unset (or True)."
        )
    return True


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
