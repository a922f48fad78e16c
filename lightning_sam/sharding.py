"""Sharded parameters (FSDP2 / tensor parallel DTensors): the local shards the engine works on and the reductions
over ranks that make norms and inner products global. Pure PyTorch, no Lightning.

Under FSDP2 (``fully_shard``) and tensor parallelism every parameter and its gradient are ``DTensor``\\ s; FSDP
reduce-scatters each backward, so a rank's gradient shard is already the *global* gradient of its slice of the
weights. Everything elementwise (save, perturb, restore, EMAs, masks applied) therefore runs on the local shards, and
a reduction (norm, inner product) is one all-reduce of the local partial sums.

A coordinate is held by ``world / (product of the mesh sizes of the dims the tensor is sharded on)`` ranks (a
``Replicate`` dim of a 2-D FSDP + TP mesh, or a plain tensor that every rank holds, e.g. a layer left out of
``fully_shard``): its partial sum is divided by that count before the all-reduce, so replicated placements are not
counted twice. ``Partial`` gradients (not yet reduced) are refused: they would not be the global gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_sam.distributed import all_reduce_sum_, world_size
from lightning_sam.tensor_ops import accumulation_dtype

try:  # torch.distributed.tensor is public since torch 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - a torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]


def is_sharded(tensors: Sequence[Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor (FSDP2, tensor parallel)."""
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def local(tensor: Tensor) -> Tensor:
    """The rank's shard of a DTensor (a view: in-place changes reach the parameter); a plain tensor as it is."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor._local_tensor
    return tensor


def holders(tensor: Tensor, world: int) -> int:
    """How many ranks hold each coordinate of ``tensor``; rejects a ``Partial`` placement (unreduced values)."""
    if DTensor is None or not isinstance(tensor, DTensor):
        return world
    shards = 1
    for dim, placement in enumerate(tensor.placements):
        if placement.is_partial():
            raise RuntimeError(
                f"a gradient has a Partial placement ({tensor.placements}): it is not reduced over the mesh yet, so "
                "it is not the global gradient SAM perturbs along. Reduce it in the model's parallel plan (e.g. "
                "tensor parallel's output layouts) so that gradients take their parameters' placements."
            )
        if not placement.is_replicate():  # Shard, or FSDP2's _StridedShard of a 2-D (FSDP + TP) mesh
            shards *= tensor.device_mesh.size(dim)
    if world % shards:
        raise RuntimeError(f"a DTensor is sharded over {shards} ranks, which does not divide the world of {world}")
    return world // shards


class ShardedReduction:
    """Sums and norms over the shards of the tensors of one step (positions aligned with the step's parameters).

    Args:
        counts: per tensor, how many ranks hold each of its coordinates (:func:`holders`).
        all_reduce_sum_: the in-place SUM over every rank (default: the default process group).
    """

    def __init__(self, counts: Sequence[int], all_reduce_sum_: Callable[[Tensor], Tensor] = all_reduce_sum_) -> None:
        self.all_reduce_sum_ = all_reduce_sum_
        self.counts = list(counts)
        # one common holder count (FSDP2 alone: every tensor sharded over every rank) needs no per-tensor weight
        self.uniform: int | None = counts[0] if counts and all(c == counts[0] for c in counts) else None
        self._weights: dict[torch.dtype, Tensor] = {}
        self._counts: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    @classmethod
    def of(cls, parameters: Sequence[Tensor]) -> ShardedReduction:
        """The reduction over ``parameters`` (DTensors or plain tensors, in step order)."""
        world = world_size()
        return cls([holders(p, world) for p in parameters])

    def subset(self, positions: Sequence[int]) -> ShardedReduction:
        """The same reduction over the tensors at ``positions`` only."""
        return ShardedReduction([self.counts[i] for i in positions], self.all_reduce_sum_)

    def total(self, per_tensor: Tensor) -> Tensor:
        """``sum_i per_tensor[i]`` over the tensors and all their shards (``per_tensor[i]``: this rank's partial sum
        for tensor ``i``), each coordinate counted once; one all-reduce, no host sync."""
        if self.uniform is not None:
            local_sum = per_tensor.sum()
            if self.uniform != 1:
                local_sum = local_sum / self.uniform
        else:
            weights = self._weights.get(per_tensor.dtype)
            if weights is None or weights.device != per_tensor.device:
                counts = torch.tensor(self.counts, dtype=per_tensor.dtype, device=per_tensor.device)
                weights = self._weights[per_tensor.dtype] = 1.0 / counts
            local_sum = (per_tensor * weights).sum()
        return self.all_reduce_sum_(local_sum)

    def totals(self, per_tensor: Tensor) -> Tensor:
        """Per tensor, ``per_tensor[..., i]`` summed over all its shards, each coordinate counted once (one
        all-reduce, no host sync): e.g. the squared norm of each tensor of a pair."""
        if self.uniform is not None:
            partial = per_tensor / self.uniform if self.uniform != 1 else per_tensor.clone()
        else:
            key = (per_tensor.dtype, per_tensor.device)
            counts = self._counts.get(key)
            if counts is None:  # built once per dtype and device: no host-to-device copy per step
                counts = self._counts[key] = torch.tensor(self.counts, dtype=per_tensor.dtype, device=per_tensor.device)
            partial = per_tensor / counts
        return self.all_reduce_sum_(partial)

    def norm(self, tensors: Sequence[Tensor]) -> Tensor:
        """The L2 norm of ``tensors`` (local shards, in step order) over all shards, in their accumulation dtype."""
        tensors = list(tensors)
        norms = torch._foreach_norm(tensors, 2, dtype=accumulation_dtype(tensors))
        squares = torch.stack(norms) ** 2
        return self.total(squares).sqrt()

    def dot(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        """``<a, b>`` over all shards (``a[i]`` and ``b[i]`` of the same shape and dtype)."""
        dtype = accumulation_dtype(list(a) + list(b))
        products = [torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)) for x, y in zip(a, b)]
        return self.total(torch.stack(products))


def check_gradient_placements(names: Sequence[str], parameters: Sequence[Tensor]) -> None:
    """Every DTensor parameter's gradient must be laid out as the parameter (same mesh and placements: its local
    shard then lines up with the parameter's); raise naming the first that is not."""
    for name, parameter in zip(names, parameters):
        grad = parameter.grad
        if DTensor is None or grad is None:
            continue
        if isinstance(parameter, DTensor) != isinstance(grad, DTensor) or (
            isinstance(parameter, DTensor)
            and (grad.placements != parameter.placements or grad.device_mesh != parameter.device_mesh)
        ):
            laid = getattr(grad, "placements", "a plain tensor")
            raise RuntimeError(
                f"the gradient of {name!r} is laid out as {laid}, its parameter as "
                f"{getattr(parameter, 'placements', 'a plain tensor')}: SAM perturbs each rank's shard with the "
                "gradient shard beside it, so both need the same placements (FSDP2 and tensor parallel give that)."
            )


def fsdp_modules(module: torch.nn.Module | None) -> list[torch.nn.Module]:
    """The FSDP2 (``fully_shard``) modules in ``module``, outermost first; empty without FSDP2."""
    if module is None:
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch built without distributed
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def resharding(evaluate: Callable[[], Tensor], modules: Sequence[torch.nn.Module]) -> Callable[[], Tensor]:
    """``evaluate`` followed by a reshard of every FSDP2 module. A forward without backward (a loss probe) leaves
    the root module's parameters unsharded (FSDP2 keeps them for the backward it expects), and the next forward
    would use them instead of the shards SAM changed in between; resharding makes each probe see the current
    weights."""

    def probe() -> Tensor:
        try:
            return evaluate()
        finally:
            for module in modules:
                module.reshard()  # type: ignore[operator]

    return probe


def fsdp_parameters(modules: Sequence[torch.nn.Module]) -> dict[int, Any]:
    """``id(parameter) -> FSDPParam`` for every parameter FSDP2 manages in ``modules`` (torch's internal record of
    how a parameter is sharded; the per-sample gradients of SSAM's Fisher mask need its unsharded parameter)."""
    found: dict[int, Any] = {}
    for module in modules:
        group = module._get_fsdp_state()._fsdp_param_group  # type: ignore[operator]
        for fsdp_param in group.fsdp_params if group is not None else []:
            found[id(fsdp_param.sharded_param)] = fsdp_param
    return found


def forward_tensor(parameter: Tensor, fsdp_param: Any | None) -> Tensor:
    """The tensor a forward computes with: FSDP2's unsharded parameter (valid after a forward), else ``parameter``.

    ``torch.autograd.grad`` with respect to it gives the whole (or, under tensor parallel, the TP-local) gradient of
    this rank's loss without a reduce-scatter, and FSDP2 leaves the sharded ``.grad`` untouched."""
    return parameter if fsdp_param is None else fsdp_param._unsharded_param


def sum_to_shard(total: Tensor, parameter: Tensor, fsdp_param: Any | None, data_parallel: Any | None) -> Tensor:
    """``total`` (a per-rank sum laid out as :func:`forward_tensor`'s local tensor, e.g. squared per-sample
    gradients) summed over the data-parallel ranks, as this rank's shard of ``parameter``.

    FSDP2 parameters: an all-reduce over the FSDP mesh (and the replicate mesh of HSDP), then this rank's chunk, as
    FSDP2 cuts it (``torch.chunk`` along its shard dim). Other parameters: an all-reduce over ``data_parallel``
    (a process group; ``None``: nothing to sum, as under tensor parallel alone, where every rank sees the batch)."""
    import torch.distributed as dist

    if fsdp_param is not None:
        info = fsdp_param.mesh_info
        for group in (info.shard_process_group, getattr(info, "replicate_process_group", None)):
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(total, group=group)
        chunks = torch.chunk(total, info.shard_mesh_size, dim=fsdp_param.fsdp_placement.dim)
        rank = info.shard_mesh_rank
        total = chunks[rank].clone() if rank < len(chunks) else total.new_zeros(local(parameter).shape)
    elif data_parallel is not None and dist.get_world_size(data_parallel) > 1:
        dist.all_reduce(total, group=data_parallel)
    if total.shape != local(parameter).shape:
        raise RuntimeError(
            f"a per-sample gradient sum of shape {tuple(total.shape)} does not match the rank's shard "
            f"{tuple(local(parameter).shape)}: this sharding layout is not supported by SSAM's Fisher mask"
        )
    return total
