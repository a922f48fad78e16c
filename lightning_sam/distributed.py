"""The torch.distributed primitives lightning_sam uses (pure PyTorch: no Lightning). Each is a no-op, or returns the
single-process answer, when torch.distributed is not initialized or has one process."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """In-place SUM over the default process group (plain PyTorch DDP loops included)."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(flag: Tensor) -> Tensor:
    """In-place MAX over the default process group."""
    if _distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def gather_objects(obj: object) -> list[object]:
    """``obj`` from every rank, in rank order (``[obj]`` when not distributed). A collective: all ranks call it."""
    if _distributed():
        gathered: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


__all__ = ["all_reduce_max_", "all_reduce_sum_", "gather_objects", "rank", "world_size"]
