"""Mask selection for SSAM (pure PyTorch): which coordinates of each trained tensor are perturbed.

A mask is a list with one entry per tensor: a sorted 1-D int64 tensor of kept flat indices (``None`` for "the
whole tensor"). Selection runs only at a refresh; the per-step work uses the indices with static shapes.
Ties are broken deterministically: a higher score first, then the lower flat index (stable sorts), so every
rank given the same scores selects the same mask. Scores are compared in at least fp32 (fp64 scores stay fp64).

* :func:`unstructured`: one global top-k over all coordinates, exactly ``round(N * keep)`` kept.
* :func:`structured`: whole tensors ranked by mean score, admitted greedily until ``N * keep`` is reached (the
  last one admitted may overshoot).
* :func:`n_of_m`: in every group of ``m`` consecutive weights along the input dimension (Linear: dim 1; Conv: the
  flattened ``in_channels * kh * kw`` of each filter) the ``n`` best are kept; 1-D tensors and tensors whose input
  size is not divisible by ``m`` are kept whole.
* :func:`dst_initial` / :func:`dst_update`: the dynamic-sparse-training mask (random start at exact density;
  drop the live coordinates with the smallest ``|g|``, regrow as many among the previously dead, at random).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_sam.tensor_ops import widen

Mask = list[Tensor | None]


def _offsets(sizes: Sequence[int]) -> list[int]:
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += size
    return offsets


def split_global(indices: Tensor, sizes: Sequence[int]) -> Mask:
    """Split sorted global flat indices (over the concatenation of tensors of ``sizes``) into per-tensor ones."""
    offsets = _offsets(sizes)
    bounds = torch.tensor([*offsets, sum(sizes)], device=indices.device)
    cuts = torch.searchsorted(indices, bounds).tolist()
    return [indices[cuts[i] : cuts[i + 1]] - offsets[i] for i in range(len(sizes))]


def to_global(mask: Mask, sizes: Sequence[int], device: torch.device) -> Tensor:
    """The sorted global flat indices of ``mask`` (a ``None`` entry stands for the whole tensor)."""
    parts = []
    for offset, size, kept in zip(_offsets(sizes), sizes, mask):
        if kept is None:
            parts.append(torch.arange(offset, offset + size, device=device))
        else:
            parts.append(kept.to(device) + offset)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def _top(scores: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` highest scores, ties to the lower position, sorted ascending."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def unstructured(scores: Sequence[Tensor], keep: float) -> Mask:
    """Global top-k over all coordinates: exactly ``round(N * keep)`` kept."""
    sizes = [s.numel() for s in scores]
    flat = torch.cat([widen(s.reshape(-1)) for s in scores])
    k = round(flat.numel() * keep)
    return split_global(_top(flat, k), sizes)


def structured(scores: Sequence[Tensor], keep: float) -> Mask:
    """Whole tensors by mean score, admitted greedily until ``N * keep`` coordinates are admitted."""
    sizes = [s.numel() for s in scores]
    budget = sum(sizes) * keep
    means = torch.stack([widen(s).mean() for s in scores])
    order = torch.sort(means, descending=True, stable=True).indices.tolist()
    mask: Mask = [scores[i].new_zeros(0, dtype=torch.long) for i in range(len(scores))]
    admitted = 0
    for i in order:
        if admitted >= budget:
            break
        mask[i] = None
        admitted += sizes[i]
    return mask


def n_of_m_eligible(shape: torch.Size, m: int) -> bool:
    """Whether a tensor of ``shape`` takes the N:M pattern (at least 2-D, input size divisible by ``m``)."""
    if len(shape) < 2:
        return False
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return fan_in % m == 0


def n_of_m(scores: Sequence[Tensor], n: int, m: int) -> Mask:
    """In every group of ``m`` consecutive inputs of each output row, keep the ``n`` highest scores."""
    mask: Mask = []
    for score in scores:
        if not n_of_m_eligible(score.shape, m):
            mask.append(None)
            continue
        rows = widen(score.reshape(score.shape[0], -1))
        groups = rows.reshape(rows.shape[0], -1, m)
        best = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
        base = torch.arange(groups.shape[0] * groups.shape[1], device=score.device).reshape(groups.shape[:2]) * m
        flat = (base.unsqueeze(-1) + best).reshape(-1)
        mask.append(torch.sort(flat).values)
    return mask


def dst_initial(sizes: Sequence[int], keep: float, generator: torch.Generator) -> Mask:
    """A uniformly random mask with exactly ``round(N * keep)`` kept coordinates (CPU generator)."""
    total = sum(sizes)
    k = round(total * keep)
    chosen = torch.randperm(total, generator=generator)[:k]
    return split_global(torch.sort(chosen).values, sizes)


def dst_update(mask: Mask, grad_magnitudes: Sequence[Tensor], drop_fraction: float, generator: torch.Generator) -> Mask:
    """Drop the ``k`` live coordinates with the smallest ``|g|``, regrow ``k`` among the previously dead.

    ``k = min(round(drop_fraction * L), N - L)`` with ``L`` live coordinates: the density stays exact.
    """
    sizes = [g.numel() for g in grad_magnitudes]
    total = sum(sizes)
    live = to_global(mask, sizes, torch.device("cpu"))
    k = min(round(drop_fraction * live.numel()), total - live.numel())
    if k <= 0:
        return [None if kept is None else kept.cpu() for kept in mask]
    flat = torch.cat([widen(g.reshape(-1)).cpu() for g in grad_magnitudes])
    weakest = torch.sort(flat[live], stable=True).indices[:k]
    keep_live = torch.ones(live.numel(), dtype=torch.bool)
    keep_live[weakest] = False
    dead_before = torch.ones(total, dtype=torch.bool)
    dead_before[live] = False
    dead = torch.nonzero(dead_before).reshape(-1)
    grown = dead[torch.randperm(dead.numel(), generator=generator)[:k]]
    new_live = torch.sort(torch.cat([live[keep_live], grown])).values
    return split_global(new_live, sizes)
