"""Exact selections over the shards of sharded tensors (FSDP2, tensor parallel): which ``k`` coordinates of all the
tensors together are the smallest by a key, when each rank holds only slices of them. Pure PyTorch, no Lightning.

SSAM's masks need a global top-``k`` with an exact count (its density is exact) and deterministic ties (every
layout selects what one process selects from the same scores). Gathering the scores to one rank would undo what
sharding saves, so the ``k``-th key is found by a radix select instead: eight rounds, each one all-reduce of a
256-bin histogram of the next byte of the keys; the ties at that key are then taken by their global flat index
(the lower first) with a second radix select. Coordinates held by several ranks (a ``Replicate`` placement, a
plain tensor every rank holds) are counted once through integer weights. Runs at mask refreshes only: it reads
counts on the host.

Keys are non-negative ``int64``: :func:`ascending_keys` / :func:`descending_keys` turn non-negative float scores
into keys in their order, :func:`random_keys` gives the uniformly random keys that stand in for a random
permutation, the same whatever the layout, since they depend only on the seed and the global flat index.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_sam.sharding import DTensor

_ALL_BITS = {torch.float32: (torch.int32, 2**31 - 1), torch.float64: (torch.int64, 2**63 - 1)}


def global_flat_indices(source: Tensor, offset: int = 0) -> Tensor:
    """For each coordinate of the rank's shard of ``source`` (flattened), its flat index in the whole tensor, plus
    ``offset``; ``int64``. A plain tensor is held whole: ``offset + arange(numel)``. (Builds the whole tensor's
    ``arange`` once, transiently: refreshes only.)"""
    if DTensor is not None and isinstance(source, DTensor):
        from torch.distributed.tensor import distribute_tensor

        positions = torch.arange(offset, offset + source.numel(), device=source.to_local().device)
        laid_out = distribute_tensor(
            positions.reshape(source.shape), source.device_mesh, source.placements, src_data_rank=None
        )
        return laid_out.to_local().reshape(-1)
    return torch.arange(offset, offset + source.numel(), device=source.device)


def _bits(scores: Tensor) -> Tensor:
    """The IEEE bits of non-negative float scores as non-negative ``int64`` (same order as the scores)."""
    integer, _ = _ALL_BITS[scores.dtype]
    return (scores + 0.0).view(integer).to(torch.int64)  # + 0.0: a -0.0 becomes +0.0 (its sign bit would sort it last)


def ascending_keys(scores: Tensor) -> Tensor:
    """Keys that order non-negative fp32/fp64 ``scores`` from the smallest."""
    return _bits(scores)


def descending_keys(scores: Tensor) -> Tensor:
    """Keys that order non-negative fp32/fp64 ``scores`` from the largest."""
    return _ALL_BITS[scores.dtype][1] - _bits(scores)


_MASK = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _MASK
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def random_keys(global_index: Tensor, seed: int, draw: int) -> Tensor:
    """Uniformly random non-negative ``int64`` keys, a function of ``(seed, draw, global index)`` only (SplitMix64's
    finalizer): the ``k`` smallest keys among some coordinates are a uniformly random ``k``-subset of them, the
    same on every rank and under every sharding layout."""
    stream = _signed(seed * 0xD1B54A32D192ED03 + draw * 0xABC98388FB8FAC03)
    x = (global_index.to(torch.int64) + 1) * _signed(0x9E3779B97F4A7C15) + stream
    x = x ^ _shift_right(x, 30)
    x = x * _signed(0xBF58476D1CE4E5B9)
    x = x ^ _shift_right(x, 27)
    x = x * _signed(0x94D049BB133111EB)
    x = x ^ _shift_right(x, 31)
    return x & (2**63 - 1)


class ShardedSelection:
    """Selections over the coordinates of the tensors of one model, each rank holding its shards.

    Args:
        sources: the tensors: DTensors (this rank holds their local shards) or plain tensors (held whole).
        holders: per tensor, how many ranks hold each of its coordinates (``lightning_sam.sharding.holders``).
        all_reduce_sum_: the in-place SUM over every rank.

    Attributes:
        sizes: each whole tensor's number of coordinates; ``total``: their sum.
        global_indices: per tensor, the global flat index (over the concatenation of the whole tensors, in order)
            of each coordinate of this rank's shard, flattened.
    """

    def __init__(
        self, sources: Sequence[Tensor], holders: Sequence[int], all_reduce_sum_: Callable[[Tensor], Tensor]
    ) -> None:
        self.sizes = [t.numel() for t in sources]
        self.total = sum(self.sizes)
        offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.global_indices = [global_flat_indices(t, offset) for t, offset in zip(sources, offsets)]
        common = math.lcm(*holders) if holders else 1
        self.unit = common  # every coordinate counts ``unit`` over all the ranks that hold it
        self.weights = [common // h for h in holders]
        self.all_reduce_sum_ = all_reduce_sum_

    @classmethod
    def whole(cls, tensors: Sequence[Tensor]) -> ShardedSelection:
        """The selection over plain tensors in one process (no reduction)."""
        return cls(tensors, [1] * len(tensors), lambda tensor: tensor)

    def sums(self, per_tensor: Tensor) -> Tensor:
        """Per tensor, ``per_tensor[i]`` (this rank's partial sum over its shard) summed over all shards, each
        coordinate counted once; fp64."""
        weights = torch.tensor(self.weights, dtype=torch.float64, device=per_tensor.device)
        return self.all_reduce_sum_(per_tensor.to(torch.float64) * weights) / self.unit

    def count(self, flags: Sequence[Tensor]) -> int:
        """How many coordinates, over all shards and each counted once, have ``flags`` set (a host read)."""
        local = torch.stack([f.sum() * w for f, w in zip(flags, self.weights)]).sum().reshape(1)
        return int(self.all_reduce_sum_(local.to(torch.int64))[0]) // self.unit

    def smallest(self, keys: Sequence[Tensor], candidates: Sequence[Tensor | None], k: int) -> list[Tensor]:
        """Per tensor, a bool tensor (flat, local) that marks the ``k`` candidates with the smallest ``(key, global
        index)`` over all shards: exactly ``k`` (all candidates if fewer). ``candidates[i]``: a bool tensor, or
        ``None`` for every coordinate of tensor ``i``; ``keys[i]``: non-negative ``int64``, flat, local."""
        flat_keys = [key.reshape(-1) for key in keys]
        chosen = [
            torch.ones_like(key, dtype=torch.bool) if c is None else c.reshape(-1).clone()
            for key, c in zip(flat_keys, candidates)
        ]
        if k >= self.total or self.count(chosen) <= k:
            return chosen
        if k <= 0:
            return [torch.zeros_like(c) for c in chosen]
        threshold, below = self._kth(flat_keys, chosen, k)
        ties = [c & (key == threshold) for c, key in zip(chosen, flat_keys)]
        last_index, _ = self._kth(self.global_indices, ties, k - below)
        return [
            c & ((key < threshold) | ((key == threshold) & (index <= last_index)))
            for c, key, index in zip(chosen, flat_keys, self.global_indices)
        ]

    def _kth(self, values: Sequence[Tensor], among: Sequence[Tensor], k: int) -> tuple[int, int]:
        """The ``k``-th smallest of the non-negative int64 ``values`` where ``among`` is set (each coordinate counted
        once over the shards), and how many are strictly below it; ``1 <= k <=`` their count."""
        pools = [v[m] for v, m in zip(values, among)]
        weights = [torch.full_like(p, w) for p, w in zip(pools, self.weights)]
        device = values[0].device
        prefix, remaining, below = 0, k * self.unit, 0
        for shift in range(56, -8, -8):
            histogram = torch.zeros(256, dtype=torch.int64, device=device)
            for pool, weight in zip(pools, weights):
                histogram.index_add_(0, _shift_right(pool, shift) & 255, weight)
            cumulative = torch.cumsum(self.all_reduce_sum_(histogram), 0).cpu()
            digit = int(torch.searchsorted(cumulative, torch.tensor([remaining]))[0])
            before = int(cumulative[digit - 1]) if digit else 0
            remaining -= before
            below += before
            prefix |= digit << shift
            keep = [_shift_right(pool, shift) & 255 == digit for pool in pools]
            pools = [pool[m] for pool, m in zip(pools, keep)]
            weights = [weight[m] for weight, m in zip(weights, keep)]
        return prefix, below // self.unit
