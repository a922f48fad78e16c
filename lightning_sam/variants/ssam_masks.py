"""Mask selection for SSAM (pure PyTorch): which coordinates of each trained tensor are perturbed.

A mask is a list with one entry per tensor: a sorted 1-D int64 tensor of kept flat indices into the tensor (into
this rank's shard when the tensors are sharded; ``None`` for "the whole tensor"). Selection runs only at a refresh;
the per-step work uses the indices with static shapes. Every selection goes through a
:class:`~lightning_sam.sharded_selection.ShardedSelection` (``ShardedSelection.whole`` in one process), so one
process and every sharding layout select the same coordinates from the same scores: the counts are exact over all
shards and ties are broken deterministically, a higher score first, then the lower global flat index. Scores are
compared in at least fp32 (fp64 when any is fp64). DST's random choices are the smallest
:func:`~lightning_sam.sharded_selection.random_keys` (a function of the seed, the refresh and the global index).

* :func:`unstructured`: one global top-k over all coordinates, exactly ``round(N * keep)`` kept.
* :func:`structured`: whole tensors ranked by mean score, admitted greedily until ``N * keep`` is reached (the
  last one admitted may overshoot).
* :func:`n_of_m`: in every group of ``m`` consecutive weights along the input dimension (Linear: dim 1; Conv: the
  flattened ``in_channels * kh * kw`` of each filter) the ``n`` best are kept; 1-D tensors and tensors whose input
  size is not divisible by ``m`` are kept whole.
* :func:`dst_initial` / :func:`dst_update`: the dynamic-sparse-training mask (random start at exact density;
  drop the live coordinates with the smallest ``|g|``, regrow as many among the previously dead, at random).

``shapes`` / ``selection.sizes`` are the whole tensors' (before sharding); the score tensors are this rank's shards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_sam.sharded_selection import ShardedSelection, ascending_keys, descending_keys, random_keys
from lightning_sam.tensor_ops import accumulation_dtype, widen

Mask = list[Tensor | None]


def _kept(chosen: Sequence[Tensor]) -> Mask:
    return [torch.nonzero(c).reshape(-1).cpu() for c in chosen]


def unstructured(selection: ShardedSelection, scores: Sequence[Tensor], keep: float) -> Mask:
    """Global top-k over all coordinates: exactly ``round(N * keep)`` kept."""
    dtype = accumulation_dtype(scores)
    keys = [descending_keys(s.reshape(-1).to(dtype)) for s in scores]
    return _kept(selection.smallest(keys, [None] * len(keys), round(selection.total * keep)))


def structured(selection: ShardedSelection, scores: Sequence[Tensor], keep: float) -> Mask:
    """Whole tensors by mean score, admitted greedily until ``N * keep`` coordinates are admitted."""
    sizes = selection.sizes
    budget = selection.total * keep
    partial = torch.stack([widen(s).sum().to(torch.float64) for s in scores])
    means = selection.sums(partial).cpu() / torch.tensor(sizes, dtype=torch.float64)
    order = torch.sort(means, descending=True, stable=True).indices.tolist()
    mask: Mask = [torch.zeros(0, dtype=torch.long) for _ in scores]
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


def n_of_m(scores: Sequence[Tensor], shapes: Sequence[torch.Size], n: int, m: int) -> Mask:
    """In every group of ``m`` consecutive inputs of each output row, keep the ``n`` highest scores (a shard holds
    whole rows: the input size of its rows is the whole tensor's)."""
    mask: Mask = []
    for score, shape in zip(scores, shapes):
        if not n_of_m_eligible(shape, m):
            mask.append(None)
            continue
        fan_in = shape[1:].numel()
        groups = widen(score.reshape(-1)).reshape(score.numel() // fan_in, fan_in // m, m)
        best = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
        base = torch.arange(groups.shape[0] * groups.shape[1], device=score.device).reshape(groups.shape[:2]) * m
        flat = (base.unsqueeze(-1) + best).reshape(-1)
        mask.append(torch.sort(flat).values.cpu())
    return mask


def dst_initial(selection: ShardedSelection, keep: float, seed: int) -> Mask:
    """A uniformly random mask with exactly ``round(N * keep)`` kept coordinates (draw 0 of ``seed``'s keys)."""
    keys = [random_keys(index, seed, 0) for index in selection.global_indices]
    return _kept(selection.smallest(keys, [None] * len(keys), round(selection.total * keep)))


def dst_update(
    selection: ShardedSelection,
    mask: Mask,
    grad_magnitudes: Sequence[Tensor],
    drop_fraction: float,
    seed: int,
    draw: int,
) -> Mask:
    """Drop the ``k`` live coordinates with the smallest ``|g|``, regrow ``k`` among the previously dead (the
    smallest of draw ``draw`` of ``seed``'s random keys). ``k = min(round(drop_fraction * L), N - L)`` with ``L``
    live coordinates: the density stays exact."""
    live = []
    for kept, g in zip(mask, grad_magnitudes):
        flags = torch.ones(g.numel(), dtype=torch.bool, device=g.device)
        if kept is not None:
            flags.fill_(False)
            flags[kept.to(g.device)] = True
        live.append(flags)
    count = selection.count(live)
    k = min(round(drop_fraction * count), selection.total - count)
    if k <= 0:
        return [None if kept is None else kept.cpu() for kept in mask]
    dtype = accumulation_dtype(grad_magnitudes)
    keys = [ascending_keys(g.reshape(-1).to(dtype)) for g in grad_magnitudes]
    dropped = selection.smallest(keys, live, k)
    random = [random_keys(index, seed, draw) for index in selection.global_indices]
    grown = selection.smallest(random, [~flags for flags in live], k)
    return _kept([(flags & ~drop) | grow for flags, drop, grow in zip(live, dropped, grown)])
