"""Small foreach helpers over lists of tensors (pure PyTorch, no Lightning).

Everything here works on whole parameter lists at once (``torch._foreach_*``), returns 0-dim tensors
instead of Python numbers (no host sync), and computes norms in fp32 whatever the tensors' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

EPS = 1e-12


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """One L2 norm over all ``tensors`` together, computed in fp32, as a 0-dim tensor.

    ``||[t_1, ..., t_n]|| = sqrt(sum_i ||t_i||^2)``. The result lives on the first tensor's device.
    """
    if not tensors:
        raise ValueError("global_norm needs at least one tensor")
    norms = torch._foreach_norm(list(tensors), 2, dtype=torch.float32)
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
