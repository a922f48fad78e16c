"""Slicing a training batch into per-sample pieces (SSAM's Fisher passes) and running forwards with
normalization layers on their running statistics.

A batch is sliced along dim 0 of every tensor in it, through nested tuples, lists and dicts; other leaves
(strings, numbers, None) are passed through unchanged. All tensors must agree on the batch size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

UNSLICEABLE_HINT = (
    "SSAM's Fisher mask slices each training batch along dim 0 (tensors inside tuples, lists and dicts). "
    "Use SAMCallback(variant='ssam', mask='dst', ...), which needs no per-sample passes, or make the batch a "
    "tensor/tuple/dict of tensors."
)


def _tensors(batch: Any) -> Iterator[Tensor]:
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            yield from _tensors(value)


def batch_size_of(batch: Any) -> int:
    """The common dim-0 size of the tensors in ``batch``; a clear error if there is none or they disagree."""
    sizes = {t.shape[0] for t in _tensors(batch) if t.dim() > 0}
    if len(sizes) != 1:
        found = "no tensor" if not sizes else f"tensors with different dim-0 sizes {sorted(sizes)}"
        raise ValueError(f"Cannot slice a {type(batch).__name__} batch into samples: {found}. {UNSLICEABLE_HINT}")
    return sizes.pop()


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """``batch`` restricted to samples ``start:stop`` (same structure and types)."""
    if isinstance(batch, Tensor):
        return batch[start:stop] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: slice_batch(v, start, stop) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(slice_batch(v, start, stop) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(v, start, stop) for v in batch)
    return batch


@contextlib.contextmanager
def batchnorm_in_eval(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers use (and do not update) their running statistics inside; other layers keep their mode."""
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training]
    for layer in layers:
        layer.eval()
    try:
        yield
    finally:
        for layer in layers:
            layer.train()
