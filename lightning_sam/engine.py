"""The two-pass SAM step over a list of parameters, usable from a plain PyTorch loop (no Lightning).

One step of every two-pass variant::

    loss(w).backward()            # pass 1 -> g
    engine.ascend()               # save w, w <- w + e   (e from the variant's rule)
    optimizer.zero_grad()
    loss(w).backward()            # pass 2 at w + e -> g_adv
    engine.descend()              # variant's descent gradient, then w <- saved w (bit-exact copy back)
    optimizer.step()

or, with a closure that zeroes the gradients, computes the loss, calls backward and returns the loss::

    loss = engine.step(closure)   # pass 1, ascent, pass 2, descent, restore (weights are never left perturbed)
    optimizer.step()

Mechanics shared by every variant live here: which parameters take part (those with a gradient), the saved
copy (one persistent buffer per device and dtype, allocated once), the in-place perturbation with foreach
ops, and the restore. The variant (``lightning_sam.variants``) only supplies the direction.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from lightning_sam import validation as check
from lightning_sam.params import ParamsLike, named_entries, selection, unwrap
from lightning_sam.precision import NoScaling
from lightning_sam.sharding import (
    ShardedReduction,
    check_gradient_placements,
    forward_tensor,
    fsdp_modules,
    fsdp_parameters,
    is_sharded,
    local,
    resharding,
    sum_to_shard,
)
from lightning_sam.tensor_ops import EPS, flat_like, widen, widened_dtype
from lightning_sam.variants import StepTensors, Variant, VariantInfo, resolve_variant, variant_info


class SAMEngine:
    """The plain-PyTorch core of lightning_sam: ascend, descend, restore exactly.

    Args:
        params: the trained parameters: an iterable of parameters, of ``(name, parameter)`` pairs (names key the
            variant's checkpointed state; give them for exact resume) or of param-group dicts. A group may carry
            ``rho`` (its own radius; the gradient norm stays global) and ``sam_exclude=True`` (never perturbed, not
            in the norm).
        variant: a name from :func:`lightning_sam.available_variants`, or a variant object (e.g. ``SSAM(sparsity=0.7)``,
            which then carries ``rho`` and its options; an object serves one engine).
        rho: the neighbourhood radius; ``None`` takes the variant's default.
        interval: run the ascent and pass 2 on every ``interval``-th step only (1: every step); the steps in
            between are plain optimizer steps on ``g`` with no second forward/backward.
        **variant_options: the variant's options, named as on the variant's docs page (ASAM: ``eta``).

    Only parameters whose ``.grad`` is set (and that require grad) take part in a step: the others are neither
    perturbed nor counted in any norm. The weights are saved before the ascent into a buffer allocated once and
    copied back bit-exactly (never ``w - e``).
    """

    def __init__(
        self,
        params: ParamsLike,
        variant: str | Variant = "sam",
        rho: float | None = None,
        *,
        interval: int = 1,
        **variant_options: Any,
    ):
        self.interval = check.integer("SAMEngine", "interval", interval, 1, " (1 = every step)")
        self.variant: Variant = resolve_variant(variant, rho, **variant_options)
        if getattr(self.variant, "_bound", False):
            raise ValueError(
                f"SAMEngine: the variant object {self.variant!r} serves another engine already: give each engine its "
                "own (variant.with_options() makes a fresh copy)."
            )
        self.variant._bound = True
        self.info: VariantInfo = variant_info(self.variant)
        entries = [e for e in named_entries(params) if not e[2].get("sam_exclude", False)]
        if not entries:
            raise ValueError("SAMEngine got no parameters to perturb (all excluded or none given)")
        self.names: list[str] = [name for name, _, _ in entries]
        self.params: list[Tensor] = [param for _, param, _ in entries]
        if len(set(self.names)) != len(self.names):
            raise ValueError("SAMEngine: parameter names must be unique")
        self._rhos: list[float] = []
        for name, _, options in entries:
            self._rhos.append(check.real("SAMEngine", f"rho of {name!r}", options.get("rho", self.variant.rho)))
        # FSDP2 / tensor parallel: the engine works on each rank's shards; reductions run over every rank
        self.sharded = is_sharded(self.params)
        self._locals: list[Tensor] = [local(p) for p in self.params] if self.sharded else self.params
        self._reduction: ShardedReduction | None = None
        if self.sharded:
            if not self.variant.supports_sharding:
                raise ValueError(self.variant.sharding_message or f"{self.variant.name} does not support sharding")
            self._reduction = ShardedReduction.of(self.params)
            self.variant.sharded = True
            self.variant.per_rank_state = True  # each rank holds its shards' state
            self.variant.shard_sources = list(self.params)
            self.variant.reduction = self._reduction
        self.variant.bind(list(self.names), list(self._locals))
        # A step without a saved copy (StepTensors.swap): w + e is built in the pass-1 gradients and the parameters
        # point at them during pass 2 (each later ascent: at the next w + e, built in that pass's gradients), then back
        # at their own memory (untouched: bit-exact, no copy either way). For variants whose direction_ never writes
        # the weights, on whole (unsharded) parameters of which no two share memory; per step, not when a gradient is
        # a view (DDP's gradient_as_bucket_view writes pass 2's gradients into the same buckets).
        self._can_swap = (
            self.variant.scratch_free
            and not self.sharded
            and not (self.info.sparse and self.variant.keeps_own_copy)
            and _distinct_memory(self.params)
        )
        self._saved_views: list[Tensor] | None = None
        self._cache_key: tuple[int, ...] | None = None
        self._active: StepTensors | None = None
        self._rho_groups: list[tuple[float, list[int]]] = []
        self._active_sources: list[Tensor] = []  # the parameters (DTensors when sharded) of the active step
        # FSDP2 modules to reshard after each loss probe (set by from_optimizer; see sharding.resharding)
        self.fsdp_modules: list[torch.nn.Module] = []
        # sharded per-sample gradients (SSAM's Fisher mask): FSDP2's record of each parameter (by id) and the process
        # group of the data-parallel ranks, over which the squared gradients are summed (set by from_optimizer and
        # the adapters; None: no data parallelism outside FSDP2, e.g. tensor parallel alone)
        self.fsdp_params: dict[int, Any] = {}
        self.data_parallel_group: Any | None = None
        self._perturbed = False
        self.step_count = 0
        self.last_perturbation_norm: Tensor | None = None

    @classmethod
    def from_optimizer(
        cls,
        optimizer: torch.optim.Optimizer,
        module: torch.nn.Module | None = None,
        variant: str | Variant = "sam",
        rho: float | None = None,
        *,
        select: str | Callable[[str, Tensor], bool] | None = None,
        interval: int = 1,
        **variant_options: Any,
    ) -> SAMEngine:
        """An engine over the optimizer's param groups; a group's ``sam_rho`` and ``sam_exclude`` keys are honoured.

        (``sam_rho``, not ``rho``: ``torch.optim.Adadelta`` stores its own ``rho`` in every group.)
        Parameter names come from ``module.named_parameters()`` (they key the checkpointed variant state); a
        parameter the module does not name is called ``group{g}.param{i}``. ``select`` restricts the perturbation
        (and the gradient norm) to some parameters: ``"norm"`` for those of normalization layers (SAM-ON,
        Mueller et al. 2023) or a callable ``(name, parameter) -> bool``; the others get a plain optimizer step.
        """
        module = unwrap(module)
        names = {id(p): n for n, p in module.named_parameters()} if module is not None else {}
        chosen = selection(select, module)
        groups: list[dict[str, Any]] = []
        for g, group in enumerate(optimizer.param_groups):
            entries = [(names.get(id(p), f"group{g}.param{i}"), p) for i, p in enumerate(group["params"])]
            if chosen is not None:
                left_out = [(n, p) for n, p in entries if id(p) not in chosen]
                if left_out:
                    groups.append({"params": left_out, "sam_exclude": True})
                entries = [(n, p) for n, p in entries if id(p) in chosen]
            entry: dict[str, Any] = {"params": entries}
            if "sam_rho" in group:  # not "rho": Adadelta (and others) already use that key
                entry["rho"] = group["sam_rho"]
            if "sam_exclude" in group:
                entry["sam_exclude"] = group["sam_exclude"]
            groups.append(entry)
        if chosen is not None and not any(g["params"] and not g.get("sam_exclude") for g in groups):
            raise ValueError(
                f"The params filter {select!r} selects none of the optimizer's parameters: nothing would be "
                "perturbed. Check the filter (params='norm' needs normalization layers in the module)."
            )
        engine = cls(groups, variant, rho, interval=interval, **variant_options)
        engine.fsdp_modules = fsdp_modules(module) if engine.sharded else []
        engine.fsdp_params = fsdp_parameters(engine.fsdp_modules)
        if engine.fsdp_params:  # FSDP2 shards over the data-parallel ranks
            engine.data_parallel_group = next(iter(engine.fsdp_params.values())).mesh_info.shard_process_group
        return engine

    # ------------------------------------------------------------------ properties
    @property
    def rho(self) -> float:
        """The default radius (a param group may override it)."""
        return self.variant.rho

    @property
    def is_perturbed(self) -> bool:
        """True between :meth:`ascend` and :meth:`descend` / :meth:`restore`."""
        return self._perturbed

    def needs_second_pass(self) -> bool:
        """Whether the coming step runs the ascent and pass 2 (else: a plain step, call :meth:`plain_step`)."""
        if not self.info.second_pass:
            return False
        return self.step_count % self.interval == 0 and self.variant.needs_second_pass(self.step_count)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def ascend(self, grad_scale: Tensor | None = None, *, measure: bool = True) -> Tensor | None:
        """Perturb the weights in place: save ``w`` (first ascent of the step), then ``w <- w + e``.

        ``e = rho * u / (n + eps)`` where the variant turns the current gradients into ``u`` and ``n``. The
        gradients are overwritten with ``e`` (zero them before pass 2). ``grad_scale``, if given, multiplies the
        gradients first (e.g. ``1 / loss_scale`` for gradients that are still scaled).

        Returns ``||e||`` as a 0-dim tensor (fp32; fp64 when a gradient is fp64: norms and ``rho / (n + eps)`` are
        computed in at least the parameters' precision), or ``None`` when no parameter has a gradient (nothing done).
        With ``measure=False`` the norm (a pass over ``e``) is not computed: a NaN stands in for it (the adapters
        measure only on the steps that log it).
        """
        active = self._collect(self._perturbed)
        if active is None:
            return None
        if grad_scale is not None:
            torch._foreach_mul_(active.grads, grad_scale)
        if not self._perturbed:
            self.variant.save_(active)
        self._active = active
        denominator = self.variant.direction_(active) + EPS
        if len(self._rho_groups) == 1:
            torch._foreach_mul_(active.grads, self._rho_groups[0][0] / denominator)
        else:
            for rho, positions in self._rho_groups:
                torch._foreach_mul_([active.grads[i] for i in positions], rho / denominator)
        self._perturbed = True  # from here on, restore() must run
        active.measure = measure
        perturbation_norm = self.variant.apply_(active)
        active.grads = []  # no reference kept: pass 2 writes fresh gradients, and these may go (or are the weights)
        if perturbation_norm is None:
            return torch.full((), math.nan, device=denominator.device)
        self.last_perturbation_norm = perturbation_norm
        return perturbation_norm

    @property
    def ascent_steps(self) -> int:
        """Ascent passes per step: 1, or ``k`` for multi-step variants (ascend again after each extra pass)."""
        return self.variant.ascent_steps if self.info.multi_step else 1

    @torch.no_grad()
    def descend(self, evaluate: Callable[[], Tensor] | None = None, evaluate_clobbers_grads: bool = False) -> None:
        """After the last pass: let the variant set the descent gradient, then restore the saved weights exactly.

        ``evaluate`` (optional) returns the loss on the current batch at the current weights without side effects;
        variants that probe the loss (XSAM's alpha search) use it. Set ``evaluate_clobbers_grads`` when it runs a
        backward (a training closure): the variant then keeps a copy of the gradients it still needs.
        """
        if evaluate is not None and self.fsdp_modules:
            evaluate = resharding(evaluate, self.fsdp_modules)
        try:
            if self.info.descent and self._perturbed and self._active is not None:
                active, sources = self._active, self._active_sources
                grads = [p.grad for p in sources]
                present = [i for i, g in enumerate(grads) if g is not None]
                if present:
                    descent_grads = [local(grads[i]) for i in present] if self.sharded else [grads[i] for i in present]
                    whole = len(present) == len(grads)
                    self.variant.descent_(
                        StepTensors(
                            names=[active.names[i] for i in present],
                            params=[active.params[i] for i in present],
                            grads=descent_grads,  # type: ignore[arg-type]
                            saved=[active.saved[i] for i in present] if active.saved else [],
                            step=self.step_count,
                            evaluate=evaluate,
                            evaluate_clobbers_grads=evaluate_clobbers_grads,
                            reduction=active.reduction
                            if whole or active.reduction is None
                            else active.reduction.subset(present),
                        )
                    )
                    if evaluate_clobbers_grads:  # a probing closure may have replaced the .grad tensors
                        for i in present:
                            sources[i].grad = grads[i]
        finally:
            self.restore()
        self.step_count += 1

    def samples_needed(self) -> int:
        """How many training samples the variant wants this step (SSAM's Fisher mask); 0 for none."""
        return self.variant.samples_needed(self.step_count) if self.info.samples else 0

    def collect_samples(self, loss_of_slice: Callable[[int, int], Tensor], batch_size: int) -> int:
        """Feed per-sample squared gradients of the current batch to the variant (SSAM's Fisher mask).

        ``loss_of_slice(i, j)`` must return the training loss of samples ``i:j`` of the current batch, without
        side effects. Gradients come from ``torch.autograd.grad`` in micro-batches of the variant's
        ``sample_batch_size`` (SSAM's ``fisher_batch_size``): ``p.grad`` is neither read nor changed. Call it before
        :meth:`ascend`; returns the number of samples used (at most :meth:`samples_needed`).
        """
        wanted = min(self.samples_needed(), batch_size)
        if wanted <= 0:
            return 0
        started = time.perf_counter()
        chunk = max(1, self.variant.sample_batch_size)
        trained = [(i, p) for i, p in enumerate(self.params) if p.requires_grad]
        if not trained:  # everything frozen: no gradient to collect (the steps are plain until something trains)
            return 0
        if self.sharded:
            sums = self._sharded_squared_gradients(loss_of_slice, wanted, chunk, trained)
        else:
            sums = [torch.zeros(p.shape, dtype=widened_dtype(p.dtype), device=p.device) for p in self.params]
            for start in range(0, wanted, chunk):
                stop = min(start + chunk, wanted)
                with torch.enable_grad():
                    loss = loss_of_slice(start, stop)
                    grads = torch.autograd.grad(loss, [p for _, p in trained], allow_unused=True)
                present = [(sums[i], widen(g)) for (i, _), g in zip(trained, grads) if g is not None]
                if present:
                    targets, values = zip(*present)
                    torch._foreach_addcmul_(list(targets), list(values), list(values))
        self.variant.refresh_seconds += time.perf_counter() - started
        self.variant.add_squared_gradients_(sums, wanted, self.step_count)
        return wanted

    def _sharded_squared_gradients(
        self, loss_of_slice: Callable[[int, int], Tensor], wanted: int, chunk: int, trained: list[tuple[int, Tensor]]
    ) -> list[Tensor]:
        """Per-sample squared gradients under FSDP2 / tensor parallel, summed over the data-parallel ranks, as each
        rank's shards. The gradients are taken with respect to the tensors the forward computes with (FSDP2's
        unsharded parameters: no reduce-scatter, the sharded ``.grad`` untouched); each rank sums the squares of its
        own samples, then one all-reduce per tensor over the data-parallel ranks and this rank's chunk (as a DDP
        rank's Fisher sums are all-reduced). Transiently holds one unsharded gradient and sum per tensor."""
        sums: list[Tensor] = []
        for start in range(0, wanted, chunk):
            stop = min(start + chunk, wanted)
            with torch.enable_grad():
                loss = loss_of_slice(start, stop)
                inputs = [forward_tensor(p, self.fsdp_params.get(id(p))) for _, p in trained]
                grads = torch.autograd.grad(loss, inputs, allow_unused=True)
            if not sums:
                sums = [torch.zeros(local(x).shape, dtype=widened_dtype(x.dtype), device=x.device) for x in inputs]
            for total, g in zip(sums, grads):
                if g is not None:
                    value = widen(local(g))
                    total.addcmul_(value, value)
        shards = [torch.zeros(p.shape, dtype=widened_dtype(p.dtype), device=p.device) for p in self._locals]
        for (i, p), total in zip(trained, sums):
            shards[i] = sum_to_shard(total, p, self.fsdp_params.get(id(p)), self.data_parallel_group)
        return shards

    @property
    def has_before_step(self) -> bool:
        """Whether the variant acts right before the optimizer step (see :meth:`before_optimizer_step`)."""
        return self.info.before_step

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, skip: Tensor | None = None) -> None:
        """Call right before ``optimizer.step()``, after :meth:`descend` or :meth:`plain_step` counted the step.

        Hands the variant each parameter's current learning rate (from ``optimizer.param_groups``) and ``skip``
        (a 0-dim tensor, 1.0 when the step will be skipped: no host sync). A no-op for variants without the hook.
        """
        if not self.has_before_step:
            return
        by_id = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        rates = {name: by_id[id(p)] for name, p in zip(self.names, self.params) if id(p) in by_id}
        self.variant.before_optimizer_step_(self.step_count - 1, rates, skip)

    def set_all_reduce(self, all_reduce_sum_: Callable[[Tensor], Tensor]) -> None:
        """Give the variant an in-place SUM over ranks (DDP) for state every rank must agree on."""
        self.variant.set_all_reduce(all_reduce_sum_)

    @torch.no_grad()
    def plain_step(self) -> None:
        """A step without the ascent and pass 2: the variant may adjust the descent gradient (pass 1's, e.g.
        LookSAM's reuse of ``g_v``); then the step is counted."""
        if self._perturbed:
            raise RuntimeError("plain_step() called while the weights are perturbed: call descend() or restore()")
        if self.info.plain_step:
            active = self._collect(False)
            if active is not None:
                self.variant.plain_step_(active)
        self.step_count += 1

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights back (bit-exact). Idempotent: a no-op when nothing is perturbed."""
        if self._perturbed and self._active is not None:
            self.variant.restore_(self._active)
        self._perturbed = False
        self._active = None

    def step(
        self,
        closure: Callable[[], Tensor],
        optimizer: torch.optim.Optimizer | None = None,
        probe: Callable[[], Tensor] | None = None,
        *,
        no_sync: Callable[[], AbstractContextManager[Any]] | None = None,
        sync_ascent: bool = False,
    ) -> Tensor:
        """Run one whole step of the variant; with ``optimizer``, also its pre-step hook and ``optimizer.step()``.

        ``closure`` must zero the gradients, compute the loss, call ``backward`` and return the loss. It is
        called once for pass 1 and once at ``w + e`` (not at all again for variants that skip pass 2); on return
        the weights are ``w`` again (also after an exception) and the gradients are the variant's descent
        gradient. Multi-step variants get ``k`` ascents (``k + 1`` closure calls). ``probe``: a forward-only loss on
        the same batch for variants that probe the loss (XSAM's alpha search); without it they call ``closure``
        (its backward is wasted). Without ``optimizer`` the caller runs ``engine.before_optimizer_step(optimizer)``
        (a no-op for most variants) and ``optimizer.step()``. Returns the pass-1 loss.

        Enter ``torch.autocast`` inside ``closure`` (or with ``cache_enabled=False``, as Lightning does), not around
        this call: autocast caches the low-precision casts of the weights for the life of the context, so pass 2
        inside the same context would compute with the casts of the unperturbed weights.

        Under DDP, ``no_sync`` (e.g. ``model.no_sync`` or ``lambda: fabric.no_backward_sync(model)``) makes the passes
        that need no all-reduce local: pass 1 when pass 2 follows (unless ``sync_ascent``) and the intermediate
        passes of a multi-step ascent; the last pass 2, and pass 1 of a step without pass 2, all-reduce.
        """
        from lightning_sam.step import TwoPassStep  # the driver imports the engine (for types only)

        if self.sharded and no_sync is not None:
            raise ValueError(
                "SAMEngine.step: no_sync cannot be used with sharded parameters (FSDP2 / tensor parallel): a backward "
                "without gradient sync leaves the shards' .grad unset, so the step would silently do nothing. Drop "
                "no_sync: under FSDP2 every pass already gives the global gradient (SAMCallback does the same)."
            )

        driver = TwoPassStep(self, NoScaling(skip_nonfinite=False), sync_ascent=sync_ascent)
        loss, _ = driver.run(optimizer, _ClosureReplay(closure, probe, no_sync))
        if optimizer is not None:
            driver.before_optimizer_step(optimizer)
            optimizer.step()
        return loss

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The variant's state (keyed by parameter name) and the step counter."""
        return {"variant": self.variant.name, "step": self.step_count, "variant_state": self.variant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the variant name must match."""
        if state.get("variant") != self.variant.name:
            raise ValueError(
                f"This state was saved by variant {state.get('variant')!r}, not {self.variant.name!r}: "
                "resume with the same variant."
            )
        self.step_count = int(state["step"])
        self.variant.load_state_dict(state.get("variant_state", {}))

    # ------------------------------------------------------------------ internals
    def _collect(self, perturbed: bool) -> StepTensors | None:
        """The parameters taking part in this step (with a gradient), their grads and saved views."""
        if perturbed and self._active is not None:
            # later ascent of a multi-step variant: same parameters, fresh gradients
            active = self._active
            grads = [p.grad for p in self._active_sources]
            if any(g is None for g in grads):
                raise RuntimeError("a later ascent of the step found parameters without a gradient")
            if self.sharded:
                grads = [local(g) for g in grads]
            return StepTensors(
                active.names,
                active.params,
                grads,  # type: ignore[arg-type]
                active.saved,
                ascent=active.ascent + 1,
                step=self.step_count,
                reduction=active.reduction,
                swap=active.swap,  # swapped: the parameters point at the last ascent's w + e, saved is w itself
            )
        key = tuple(i for i, p in enumerate(self.params) if p.grad is not None and p.requires_grad)
        if not key:
            return None
        if key != self._cache_key:
            self._cache_key = key
            self._key_names = [self.names[i] for i in key]
            self._key_sources = [self.params[i] for i in key]
            self._key_params = [self._locals[i] for i in key]
            self._key_saved: list[Tensor] | None = None  # views of the saved copy, once a step needs them
            self._key_reduction = None if self._reduction is None else self._reduction.subset(key)
            if self._reduction is not None:
                check_gradient_placements([self.names[i] for i in key], self._key_sources)
            groups: dict[float, list[int]] = {}
            for position, i in enumerate(key):
                groups.setdefault(self._rhos[i], []).append(position)
            self._rho_groups = list(groups.items())
        self._active_sources = sources = self._key_sources
        # sharded: this rank's shards (local tensors of the DTensors, write-through views)
        grads = [local(p.grad) for p in sources] if self.sharded else [p.grad for p in sources]  # type: ignore[arg-type]
        swap = self._can_swap and not any(g._is_view() for g in grads)  # type: ignore[union-attr]
        saved: list[Tensor] = []
        if not swap:
            if self._saved_views is None:
                own_copy = self.info.sparse and self.variant.keeps_own_copy
                self._saved_views = [] if own_copy else self._allocate_saved()
            if self._key_saved is None:
                self._key_saved = [self._saved_views[i] for i in key] if self._saved_views else []
            saved = self._key_saved
        return StepTensors(
            self._key_names,
            self._key_params,
            grads,  # type: ignore[arg-type]
            saved,
            step=self.step_count,
            reduction=self._key_reduction,
            swap=swap,
        )

    def _allocate_saved(self) -> list[Tensor]:
        """One flat buffer per (device, dtype), allocated once; a view of it per parameter."""
        return flat_like(self._locals)

    def __repr__(self) -> str:
        return f"SAMEngine({self.variant!r}, {len(self.params)} parameters, step={self.step_count})"


def _distinct_memory(params: list[Tensor]) -> bool:
    """Whether no two of ``params`` share memory (a parameter viewing another's storage must stay where it is)."""
    pointers = [p.untyped_storage().data_ptr() for p in params if p.numel()]
    return len(set(pointers)) == len(pointers)


class _ClosureReplay:
    """:meth:`SAMEngine.step`'s replay: every pass is the training closure (it zeroes, computes, backpropagates),
    inside ``no_sync()`` when the pass must not all-reduce."""

    def __init__(
        self,
        closure: Callable[[], Tensor],
        probe: Callable[[], Tensor] | None,
        no_sync: Callable[[], AbstractContextManager[Any]] | None,
    ) -> None:
        self.closure, self.probe_fn, self.no_sync = closure, probe, no_sync
        self.probe_clobbers_grads = probe is None

    def first_pass(self, sync: bool) -> Tensor:
        return self.second_pass(sync)

    def second_pass(self, sync: bool) -> Tensor:
        with nullcontext() if sync or self.no_sync is None else self.no_sync():
            return self.closure()

    def probe(self) -> Tensor:
        return (self.probe_fn or self.closure)()
