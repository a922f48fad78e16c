"""Small foreach helpers over lists of tensors (pure PyTorch, no Lightning).

Everything here works on whole parameter lists at once (``torch._foreach_*``) and returns 0-dim tensors
instead of Python numbers (no host sync).

Precision rule (used by every variant): norms, inner products and variant buffers are computed in *at least* the
tensors' precision, never below fp32: fp32 for fp16 / bf16 / fp32 tensors, fp64 for fp64 tensors
(:func:`accumulation_dtype` for a list, :func:`widen` / :func:`widened_dtype` for one tensor).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

EPS = 1e-12


def widened_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to accumulate a tensor of ``dtype`` in: ``promote_types(dtype, float32)`` (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def widen(tensor: Tensor) -> Tensor:
    """``tensor`` in :func:`widened_dtype` of its dtype; the tensor itself (no copy) when it already is."""
    return tensor.to(widened_dtype(tensor.dtype))


def accumulation_dtype(tensors: Iterable[Tensor]) -> torch.dtype:
    """The dtype to accumulate a reduction over ``tensors`` in: fp64 if any of them is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """One L2 norm over all ``tensors`` together, as a 0-dim tensor in :func:`accumulation_dtype` of them.

    ``||[t_1, ..., t_n]|| = sqrt(sum_i ||t_i||^2)``, accumulated in fp32 (fp64 when any tensor is fp64). The result
    lives on the first tensor's device.
    """
    if not tensors:
        raise ValueError("global_norm needs at least one tensor")
    tensors = list(tensors)
    norms = torch._foreach_norm(tensors, 2, dtype=accumulation_dtype(tensors))
    device = norms[0].device
    if any(n.device != device for n in norms):
        norms = [n.to(device) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms))


def non_finite_flag(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim fp32 tensor: 1.0 if any element of ``tensors`` is inf or NaN, else 0.0 (no host sync)."""
    return (~torch.isfinite(global_norm(tensors))).float()


def group_by_device(tensors: Sequence[Tensor]) -> dict[torch.device, list[int]]:
    """Indices of ``tensors`` grouped by device (foreach kernels and AMP helpers need one device per call)."""
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    return groups


def flat_like(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Uninitialized tensors shaped as ``tensors`` (same dtype and device), views of one flat buffer per (device,
    dtype): one allocation per group instead of one per tensor."""
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    for t in tensors:
        key = (t.device, t.dtype)
        sizes[key] = sizes.get(key, 0) + t.numel()
    buffers = {key: torch.empty(n, device=key[0], dtype=key[1]) for key, n in sizes.items()}
    offsets = dict.fromkeys(sizes, 0)
    views = []
    for t in tensors:
        key = (t.device, t.dtype)
        views.append(buffers[key][offsets[key] : offsets[key] + t.numel()].view_as(t))
        offsets[key] += t.numel()
    return views
