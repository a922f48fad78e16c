"""SSAM, sparse SAM (Mi et al., 2022; journal extension 2023): perturb only a chosen fraction of coordinates.

With a 0/1 mask ``M`` over all trained coordinates and ``sparsity = s`` the fraction NOT perturbed::

    e = rho * (g * M) / (||g|| + eps)        the norm over ALL coordinates of g, the mask applied after it
    descent gradient = g_adv                 (so ||e|| <= rho)

Masks (``mask=``): ``"fisher"`` (SSAM-F, default), the top coordinates of the empirical Fisher
``F = sum_i (grad l_i)^2`` over ``num_samples`` training samples taken from the batches the adapter already
receives; ``"dst"`` (SSAM-D), a random start at exact density refreshed by dropping the live coordinates with the
smallest ``|g|`` and regrowing as many among the dead ones at random, with the cosine-decayed drop fraction
``r = drop_rate * (1 + cos(pi * t / T)) / 2``. Patterns (``pattern=``): ``"unstructured"`` (global top-k),
``"structured"`` (whole tensors by mean score), ``"n:m"`` (``n`` of every ``m`` inputs). Masks are refreshed every
``mask_every`` optimizer steps. Until the first Fisher mask exists a step is a plain optimizer step on ``g`` (no
pass 2). ``sparsity = 0`` is SAM exactly, from the first step.

How the step is stored (``storage=``): ``"dense"`` (default) keeps a whole saved copy of the weights and a bool mask
per tensor, and runs the step as SAM does, a few foreach ops over all tensors (``w`` saved, ``e <- e * M``,
``w <- w + e``, ``w`` copied back): as fast as SAM with many tensors, 5 bytes of extra memory per fp32 coordinate.
``"sparse"`` saves, perturbs and restores the kept coordinates only (flat indices computed at a refresh, then
``index_select`` / ``index_add_`` / ``index_put_`` per tensor with static shapes: no host sync per step): 8 bytes
per *kept* coordinate, so the extra memory falls with the sparsity (less than dense below a density of 5/8), at
the price of a few ops per tensor and step. Both give the same weights, bit for bit. Defaults: ``rho = 0.05``,
``sparsity = 0.5``, ``num_samples = 128``, ``fisher_batch_size = 1``, ``mask_every = 100`` steps (the callback:
one epoch for fisher, five for dst), ``drop_rate = 0.5``, ``n, m = 2, 4``, ``storage = "dense"``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from lightning_sam import validation as check
from lightning_sam.sharded_selection import ShardedSelection
from lightning_sam.tensor_ops import accumulation_dtype, widen, widened_dtype
from lightning_sam.variants import ssam_masks as masks
from lightning_sam.variants.base import RunLength, StepTensors, Variant

MASKS = ("fisher", "dst")
PATTERNS = ("unstructured", "structured", "n:m")
STORAGES = ("dense", "sparse")


class SSAM(Variant, name="ssam"):
    """Sparse SAM: ``e = rho * (g * M) / (||g|| + eps)`` with a Fisher or DST mask ``M``; see the module docstring.

    Args:
        rho: neighbourhood radius (default 0.05).
        sparsity: fraction of coordinates NOT perturbed, in ``[0, 1)`` (default 0.5; ignored by ``"n:m"``).
        mask: ``"fisher"`` (default) or ``"dst"``.
        pattern: ``"unstructured"`` (default), ``"structured"`` or ``"n:m"`` (``dst`` takes ``"unstructured"`` only).
        n: kept weights per group of the N:M pattern, ``1 <= n < m`` (default 2).
        m: group size of the N:M pattern (default 4).
        num_samples: training samples per Fisher mask (default 128).
        fisher_batch_size: samples per Fisher micro-batch (default 1: exact per-sample gradients).
        mask_every: optimizer steps between refreshes (``None``: 100 in ``SAMEngine``; the callback uses one
            epoch for ``fisher`` and five for ``dst``).
        drop_rate: DST's initial drop fraction, in ``[0, 1]`` (default 0.5).
        seed: seeds DST's random start and regrowth (identical on every rank).
        total_steps: ``T`` of DST's cosine schedule (the callback fills it in from the Trainer).
        storage: ``"dense"`` (default: a whole saved copy and bool masks, foreach ops, SAM's speed) or ``"sparse"``
            (the kept coordinates only: less memory at high sparsity, per-tensor index ops).
    """

    def __init__(
        self,
        rho: float | None = None,
        sparsity: float = 0.5,
        mask: str = "fisher",
        pattern: str = "unstructured",
        n: int = 2,
        m: int = 4,
        num_samples: int = 128,
        fisher_batch_size: int = 1,
        mask_every: int | None = None,
        drop_rate: float = 0.5,
        seed: int = 0,
        total_steps: int | None = None,
        storage: str = "dense",
    ) -> None:
        super().__init__(rho)
        sparsity = check.real("ssam", "sparsity", sparsity, "in [0, 1)", " (the fraction NOT perturbed)")
        check.choice("ssam", "mask", mask, MASKS)
        check.choice("ssam", "pattern", pattern, PATTERNS)
        check.choice("ssam", "storage", storage, STORAGES)
        if mask == "dst" and pattern != "unstructured":
            raise ValueError("ssam: mask='dst' takes pattern='unstructured' only; use mask='fisher' for other patterns")
        check.integer("ssam", "n", n, 1)
        check.integer("ssam", "m", m, 2)
        if n >= m:
            raise ValueError(f"ssam: the N:M pattern needs 1 <= n < m, got n={n}, m={m}")
        check.integer("ssam", "num_samples", num_samples, 1)
        self.sample_batch_size = check.integer("ssam", "fisher_batch_size", fisher_batch_size, 1)
        if mask_every is not None:
            check.integer("ssam", "mask_every", mask_every, 1)
        drop_rate = check.real("ssam", "drop_rate", drop_rate, "in [0, 1]")
        check.integer("ssam", "seed", seed, 0)
        if total_steps is not None:
            check.integer("ssam", "total_steps", total_steps, 1)
        self.sparsity = sparsity
        self.mask = mask
        self.pattern = pattern
        self.n, self.m = n, m
        self.num_samples = num_samples
        self.fisher_batch_size = fisher_batch_size
        self.mask_every = mask_every if mask_every is not None else 100
        self.drop_rate = float(drop_rate)
        self.seed = seed
        self.total_steps = total_steps
        self.storage = storage
        self.keeps_own_copy = storage == "sparse"  # dense: the engine's whole saved copy, as for SAM
        self.scratch_free = storage == "dense"  # dense: the engine may swap instead of copying, as for SAM
        # state
        self._names: list[str] = []
        self._params: list[Tensor] = []
        self._kept: masks.Mask | None = None  # per parameter: sorted int64 CPU indices, or None = whole tensor
        self._fisher: list[Tensor] | None = None
        self._fisher_count = 0
        self._draws = 0  # DST refreshes so far: refresh r regrows by draw r of the seed's random keys
        self._last_change: Tensor | None = None
        self._refreshed = False
        self._completed_at = -1  # the step in which the last Fisher refresh completed
        self._next_dst = 0  # the first step at or after which the next DST refresh runs
        # Fisher partial sums differ per rank while a refresh spans steps: checkpoint every rank's
        self.per_rank_state = mask == "fisher"
        self.fully_perturbed: list[str] = []  # N:M: tensors that cannot take the pattern, perturbed whole
        # per-step buffers, rebuilt at a refresh (sparse: kept indices on the device; dense: bool masks)
        self._device_index: dict[str, Tensor | None] = {}
        self._saved: dict[str, Tensor] = {}
        self._scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._dense_masks: dict[str, Tensor | None] = {}
        self._masked: tuple[list[str], list[int], list[Tensor]] | None = None  # dense: per step's names list

    @classmethod
    def run_defaults(cls, options: dict[str, Any], run: RunLength) -> dict[str, Any]:
        dst = options.get("mask", "fisher") == "dst"
        defaults: dict[str, Any] = {}
        if options.get("mask_every") is None:
            period = "every 5 epochs" if dst else "once per epoch"
            what = f"its {'DST' if dst else 'Fisher'} mask is refreshed {period} by default"
            defaults["mask_every"] = max(1, run.epoch("ssam", what, "mask_every") * (5 if dst else 1))
        if options.get("total_steps") is None:
            if dst:
                what = "mask='dst' anneals its drop rate over the whole run"
                defaults["total_steps"] = max(1, run.total("ssam", what, "total_steps"))
            elif run.total_steps is not None:
                defaults["total_steps"] = max(1, run.total_steps)
        return defaults

    # ------------------------------------------------------------------ setup
    def bind(self, names: list[str], params: list[Tensor]) -> None:
        self._names, self._params = list(names), list(params)
        # the whole tensors' shapes (sharded: bind's tensors are this rank's shards of shard_sources)
        self._shapes = [t.shape for t in (self.shard_sources if self.sharded and self.shard_sources else params)]
        self._total = sum(shape.numel() for shape in self._shapes)
        if self.pattern == "n:m":
            whole = [n for n, shape in zip(names, self._shapes) if not masks.n_of_m_eligible(shape, self.m)]
            if len(whole) == len(names):
                raise ValueError(
                    f"ssam: no trained tensor can take the {self.n}:{self.m} pattern (it needs at least 2-D tensors "
                    f"whose input size is divisible by m={self.m}); choose another pattern or m"
                )
            self.fully_perturbed = whole  # reported once by the adapters
            if self.sharded:
                _check_whole_rows(names, self.shard_sources or [], whole)
        if self.mask == "dst" and self.total_steps is None:
            raise ValueError("ssam: mask='dst' needs total_steps=... for its cosine schedule (SAMCallback sets it)")
        if self.sparsity == 0 and self.pattern != "n:m":
            self._set_mask([None] * len(params))
        elif self.mask == "dst" and self._kept is None:
            self._set_mask(masks.dst_initial(self._selection(), 1 - self.sparsity, self.seed))

    @property
    def setup_message(self) -> str:
        whole = self.fully_perturbed
        return f"these tensors cannot take the N:M pattern and are perturbed whole: {whole}" if whole else ""

    # ------------------------------------------------------------------ the rule
    def needs_second_pass(self, step_index: int) -> bool:
        return self._kept is not None

    def direction_(self, step: StepTensors) -> Tensor:
        return step.norm(step.grads)  # u = g; the mask is applied in apply_

    def save_(self, step: StepTensors) -> None:
        # A DST refresh changes the kept set (and its buffers), so it runs here, before anything is saved.
        if self.mask == "dst" and self.sparsity > 0 and step.step >= self._next_dst:
            if step.step > 0:  # step 0 keeps the random start
                self._refresh_dst(step)
            self._next_dst = (step.step // self.mask_every + 1) * self.mask_every
        if self.storage == "dense":
            super().save_(step)
            return
        for name, p in zip(step.names, step.params):
            index, saved = self._device_index[name], self._saved[name]
            if index is None:
                saved.copy_(p)
            elif index.numel():
                torch.index_select(p.reshape(-1), 0, index, out=saved)

    def apply_(self, step: StepTensors) -> Tensor | None:
        if self.storage == "dense":  # e <- e * M, then SAM's w <- w + e
            masked, masks_ = self._dense_masks_of(step)
            if masked:
                torch._foreach_mul_([step.grads[i] for i in masked], masks_)
            return super().apply_(step)
        squares: list[Tensor] = []
        measure = step.measure
        for name, p, e in zip(step.names, step.params, step.grads):
            index = self._device_index[name]
            if index is None:
                p.add_(e)
                if measure:
                    flat = widen(e.reshape(-1))  # >= fp32 (fp64 for fp64), no copy for fp32 / fp64
                    squares.append(torch.dot(flat, flat))
            elif not index.numel():
                if measure:
                    squares.append(torch.zeros((), dtype=widened_dtype(e.dtype), device=p.device))
            else:
                if e.dtype == p.dtype:
                    kept = self._scratch[(p.device, p.dtype)][: index.numel()]
                    torch.index_select(e.reshape(-1), 0, index, out=kept)
                else:  # gradients in another dtype than the weights: rare, pays a small allocation
                    kept = e.reshape(-1).index_select(0, index).to(p.dtype)
                p.reshape(-1).index_add_(0, index, kept)
                if measure:
                    flat = widen(kept)
                    squares.append(torch.dot(flat, flat))
        if not measure:
            return None
        if not squares:
            return torch.zeros((), dtype=accumulation_dtype(step.grads), device=step.params[0].device)
        device, dtype = squares[0].device, accumulation_dtype(step.grads)
        per_tensor = torch.stack([s.to(device=device, dtype=dtype) for s in squares])
        return (per_tensor.sum() if step.reduction is None else step.reduction.total(per_tensor)).sqrt()

    def restore_(self, step: StepTensors) -> None:
        if self.storage == "dense":
            super().restore_(step)
            return
        for name, p in zip(step.names, step.params):
            index, saved = self._device_index[name], self._saved[name]
            if index is None:
                p.copy_(saved)
            elif index.numel():
                p.reshape(-1).index_put_((index,), saved)

    def _dense_masks_of(self, step: StepTensors) -> tuple[list[int], list[Tensor]]:
        """Dense storage: the positions in ``step`` of the partly kept tensors, and their bool masks. Built when the
        step's parameter list or the mask changes (the engine keeps the same names list while the same parameters
        have gradients), so a step builds no list."""
        if self._masked is None or self._masked[0] is not step.names:
            masked = [i for i, name in enumerate(step.names) if self._dense_masks[name] is not None]
            self._masked = (step.names, masked, [self._dense_masks[step.names[i]] for i in masked])  # type: ignore[misc]
        return self._masked[1], self._masked[2]

    # ------------------------------------------------------------------ Fisher
    def samples_needed(self, step_index: int) -> int:
        if self.mask != "fisher" or (self.sparsity == 0 and self.pattern != "n:m"):
            return 0
        if self._fisher is None and (step_index % self.mask_every != 0 or step_index == self._completed_at):
            return 0  # not a refresh step, or a refresh already completed in this step (accumulation windows)
        return self.num_samples - self._fisher_count

    def add_squared_gradients_(self, squared: list[Tensor], count: int, step_index: int) -> None:
        if count <= 0:
            return
        if self._fisher is None:
            self._fisher = list(squared)  # fresh buffers from the engine: kept as the running sums
        else:
            torch._foreach_add_(self._fisher, squared)
        self._fisher_count += count
        if self._fisher_count >= self.num_samples:
            fisher, self._fisher, self._fisher_count = self._fisher, None, 0
            self._completed_at = step_index
            self.sum_tensors_over_ranks_(fisher)  # every rank selects from the same sums
            self._refresh_from_scores(fisher)

    # ------------------------------------------------------------------ refreshes
    def _selection(self) -> ShardedSelection:
        """Exact counts and top-k over every shard (the whole tensors in one process)."""
        if self.sharded and self.shard_sources is not None and self.reduction is not None:
            return ShardedSelection(self.shard_sources, self.reduction.counts, self.reduction.all_reduce_sum_)
        return ShardedSelection.whole(self._params)

    def _refresh_from_scores(self, scores: list[Tensor]) -> None:
        started = time.perf_counter()
        keep = 1 - self.sparsity
        if self.pattern == "unstructured":
            new = masks.unstructured(self._selection(), scores, keep)
        elif self.pattern == "structured":
            new = masks.structured(self._selection(), scores, keep)
        else:
            new = masks.n_of_m(scores, self._shapes, self.n, self.m)
        self._set_mask(new)
        self.refresh_seconds += time.perf_counter() - started

    def _refresh_dst(self, step: StepTensors) -> None:
        assert self._kept is not None and self.total_steps is not None
        started = time.perf_counter()
        by_name = dict(zip(step.names, step.grads))
        grads = [  # fresh copies in >= fp32 (fp64 for fp64 parameters): summed over ranks in place below
            by_name[name].detach().to(dtype=widened_dtype(p.dtype), copy=True)
            if name in by_name
            else torch.zeros(p.shape, dtype=widened_dtype(p.dtype), device=p.device)
            for name, p in zip(self._names, self._params)
        ]
        self.sum_tensors_over_ranks_(grads)  # the pass-1 gradient summed over ranks: the same mask everywhere
        fraction = self.drop_rate * 0.5 * (1 + math.cos(math.pi * step.step / self.total_steps))
        self._draws += 1
        magnitudes = [g.abs() for g in grads]
        self._set_mask(masks.dst_update(self._selection(), self._kept, magnitudes, fraction, self.seed, self._draws))
        self.refresh_seconds += time.perf_counter() - started

    def _set_mask(self, new: masks.Mask) -> None:
        new = [None if kept is None else kept.cpu().long() for kept in new]
        kept = [float(p.numel() if k is None else k.numel()) for p, k in zip(self._params, new)]
        if self._kept is None:
            self._kept_total = round(float(self._global_counts(torch.tensor([kept])).sum()))
        else:  # and per tensor, the kept coordinates that were not kept before
            pairs = zip(kept, self._params, self._kept, new)
            changed = [k - _overlap(old, fresh, p.numel()) for k, p, old, fresh in pairs]
            totals = self._global_counts(torch.tensor([kept, changed])).sum(dim=1).tolist()
            self._kept_total = round(totals[0])
            self._last_change = torch.tensor(round(totals[1]) / max(1, self._kept_total))
        self._refreshed = True
        self._kept = new
        self._masked = None
        if self.storage == "dense":
            self._set_dense_masks(new)
            return
        self._device_index, self._saved, scratch_sizes = {}, {}, {}
        for name, p, kept in zip(self._names, self._params, new):
            if kept is None:
                self._device_index[name] = None
                self._saved[name] = torch.empty_like(p)
            else:
                index_dtype = torch.int32 if p.numel() < 2**31 else torch.long  # int32 halves the index memory
                self._device_index[name] = kept.to(device=p.device, dtype=index_dtype)
                self._saved[name] = torch.empty(kept.numel(), dtype=p.dtype, device=p.device)
                key = (p.device, p.dtype)
                scratch_sizes[key] = max(scratch_sizes.get(key, 0), kept.numel())
        self._scratch = {key: torch.empty(size, dtype=key[1], device=key[0]) for key, size in scratch_sizes.items()}

    def _set_dense_masks(self, new: masks.Mask) -> None:
        """Dense storage: a bool mask per partly kept tensor (None: kept whole). The saved copy is the engine's."""
        self._dense_masks = {}
        for name, p, kept in zip(self._names, self._params, new):
            if kept is None:
                self._dense_masks[name] = None
            else:
                mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
                mask[kept.to(p.device)] = True
                self._dense_masks[name] = mask.view(p.shape)

    # ------------------------------------------------------------------ reporting and state
    def _global_counts(self, counts: Tensor) -> Tensor:
        """Counts per tensor (the last dim) summed over the shards, each coordinate counted once (one all-reduce);
        the counts themselves in one process."""
        counts = counts.to(torch.float64)
        if not self.sharded or self.reduction is None:
            return counts
        device = self._params[0].device if self._params else torch.device("cpu")
        return self.reduction.totals(counts.to(device)).cpu()

    def kept_count(self) -> int:
        """Number of perturbed coordinates over all shards (0 before the first mask)."""
        return 0 if self._kept is None else self._kept_total

    def dense_masks(self) -> dict[str, Tensor] | None:
        """The current mask as bool tensors keyed by parameter name (for inspection and tests; sharded: this
        rank's shards)."""
        if self._kept is None:
            return None
        result = {}
        for name, p, kept in zip(self._names, self._params, self._kept):
            dense = torch.zeros(p.numel(), dtype=torch.bool)
            dense[slice(None) if kept is None else kept] = True
            result[name] = dense.reshape(p.shape)
        return result

    def metrics(self) -> dict[str, Tensor]:
        if self._kept is None:
            return {}
        values = {"sam/mask_density": torch.tensor(self.kept_count() / self._total)}
        if self._refreshed:  # a refresh completed since the last report
            if self._last_change is not None:
                values["sam/mask_change"] = self._last_change
            values["sam/mask_refresh_seconds"] = torch.tensor(self.refresh_seconds)
            self._last_change = None
            self._refreshed = False
            self.refresh_seconds = 0.0
        return values

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "draws": self._draws,
            "fisher_count": self._fisher_count,
            "completed_at": self._completed_at,
            "next_dst": self._next_dst,
        }
        if self._kept is not None:
            state["kept"] = {
                name: None if kept is None else kept.to(torch.int32 if p.numel() < 2**31 else torch.long)
                for name, p, kept in zip(self._names, self._params, self._kept)
            }
        if self._fisher is not None:
            state["fisher"] = {name: f.detach().cpu() for name, f in zip(self._names, self._fisher)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._draws = int(state.get("draws", 0))
        self._fisher_count = int(state.get("fisher_count", 0))
        self._completed_at = int(state.get("completed_at", -1))
        self._next_dst = int(state.get("next_dst", 0))
        if "fisher" in state:
            self._fisher = [  # Fisher sums in >= fp32 (fp64 for fp64 parameters), whatever dtype they were saved in
                state["fisher"][name].to(device=p.device, dtype=widened_dtype(p.dtype))
                for name, p in zip(self._names, self._params)
            ]
        else:
            self._fisher = None
        if "kept" in state:
            kept = [None if state["kept"][n] is None else state["kept"][n].long() for n in self._names]
            self._kept = None
            self._set_mask(kept)
            self._last_change = None
            self._refreshed = False

    def extra_repr(self) -> str:
        return (
            f"rho={self.rho}, sparsity={self.sparsity}, mask={self.mask!r}, pattern={self.pattern!r}, "
            f"n={self.n}, m={self.m}, mask_every={self.mask_every}, storage={self.storage!r}"
        )


def _overlap(old: Tensor | None, fresh: Tensor | None, size: int) -> int:
    """How many coordinates two masks of one tensor (kept indices, ``None`` = all ``size``) both keep."""
    if old is None:
        return size if fresh is None else fresh.numel()
    if fresh is None:
        return old.numel()
    return int(torch.isin(fresh, old).sum())


def _check_whole_rows(names: list[str], sources: list[Tensor], whole: list[str]) -> None:
    """The N:M pattern groups inputs within each output row: a shard must hold whole rows (sharded along dim 0
    only: FSDP2, ``ColwiseParallel``), else the groups would straddle ranks."""
    for name, source in zip(names, sources):
        placements = getattr(source, "placements", ())
        split = [p for p in placements if not p.is_replicate() and getattr(p, "dim", 0) != 0]
        if name not in whole and split:
            raise ValueError(
                f"ssam: the N:M pattern needs each rank to hold whole rows of {name!r}, which is sharded as "
                f"{tuple(placements)} (along its inputs). Shard it along dim 0 (FSDP2, ColwiseParallel), or use "
                "pattern='unstructured' or 'structured'."
            )
