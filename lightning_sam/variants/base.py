"""The contract every variant implements (pure PyTorch, no Lightning).

A variant is a small rule. The engine (``lightning_sam.engine.SAMEngine``) owns the mechanics (which parameters take
part, the saved copy, the in-place perturbation, the exact restore) and asks the variant only for what differs:

* :meth:`Variant.direction_` (every variant with a second pass) turns the pass-1 gradients, in place, into the
  *unnormalized* ascent direction ``u`` and returns the denominator ``n``: the engine perturbs
  ``w <- w + rho * u / (n + eps)``;
* :meth:`Variant.needs_second_pass` may make a step a plain optimizer step on ``g`` (no ascent, no pass 2);
* :meth:`Variant.state_dict` / :meth:`Variant.load_state_dict` carry state keyed by parameter name, so a fresh
  process resumes exactly; :meth:`Variant.metrics` are logged by the adapters.

The optional extension points below are used only when the variant's registry entry
(:class:`lightning_sam.variants.VariantInfo`) declares them, never discovered from the class: ``descent_``
(replace the descent gradient; XSAM, LookSAM), ``plain_step_`` (change a step without pass 2; LookSAM),
``ascent_steps`` (multi-step ascent; XSAM), ``save_`` / ``apply_`` / ``restore_`` (perturb a subset of coordinates
and save only those; SSAM), ``samples_needed`` / ``add_squared_gradients_`` (per-sample gradients; SSAM's Fisher),
``before_optimizer_step_`` (act right before the optimizer step; BAR) and ``run_defaults`` (options derived from the
epoch or run length; SSAM, XSAM, BAR).

A variant object is also its own configuration: the keyword arguments it was built with are kept
(:attr:`Variant.config`), so that ``SAMCallback(variant=SSAM(sparsity=0.5))`` and LightningCLI's
``class_path`` / ``init_args`` configure it, and the adapters build the working copy with :meth:`Variant.with_options`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_sam import validation as check
from lightning_sam.distributed import all_reduce_sum_, world_size
from lightning_sam.sharding import ShardedReduction
from lightning_sam.tensor_ops import accumulation_dtype, global_norm


def _is_default(value: Any, default: Any) -> bool:
    if value is default:
        return True
    try:
        return type(value) is type(default) and bool(value == default)
    except (RuntimeError, TypeError, ValueError):  # e.g. lists of tensors
        return False


@dataclass(frozen=True)
class RunLength:
    """What the Lightning adapters know of the run, in optimizer steps, for options derived from it.

    ``steps_per_epoch`` (the loaded train dataloader's batches after ``limit_train_batches``, divided by
    ``accumulate_grad_batches``, rounded up) and ``total_steps`` (the run's length: ``max_steps`` or ``max_epochs``
    epochs, whichever ends the run first) are ``None`` when they cannot be known; ``why_no_epoch`` /
    ``why_no_total`` then say why, for the variant's error message.
    """

    steps_per_epoch: int | None
    total_steps: int | None
    why_no_epoch: str = "the epoch length is unknown"
    why_no_total: str = "the run length is unknown"

    def epoch(self, variant: str, what: str, option: str) -> int:
        """The epoch length, or an error naming the option the user must pass instead (``what`` needs it)."""
        if self.steps_per_epoch is None:
            raise ValueError(f"{variant}: {what}, but {self.why_no_epoch}. Pass {option}=<optimizer steps>.")
        return self.steps_per_epoch

    def total(self, variant: str, what: str, option: str) -> int:
        """The run length, or an error naming the option the user must pass instead (``what`` needs it)."""
        if self.total_steps is None:
            raise ValueError(f"{variant}: {what}, but {self.why_no_total}. Pass {option}=<optimizer steps>.")
        return self.total_steps


@dataclass
class StepTensors:
    """The tensors of one step, restricted to the parameters that take part (those with a gradient).

    ``names[i]``, ``params[i]``, ``grads[i]`` and ``saved[i]`` describe the same parameter. ``saved`` holds
    the weights as they were before the first ascent of the step (what the engine copies back). ``ascent`` counts
    the ascents of this step before this one (0 for single-step variants; multi-step variants ascend again);
    ``step`` is the engine's optimizer-step counter. In :meth:`Variant.descent_`, ``evaluate()`` (when the adapter
    can provide it) returns the loss on the current batch at the current weights, without side effects;
    ``evaluate_clobbers_grads`` says whether it overwrites the gradients (a closure that runs backward). A variant
    registered with ``sparse=True`` gets ``saved = []`` and keeps its own (sparse) copy in :meth:`Variant.save_` /
    :meth:`Variant.restore_`, unless the instance sets ``keeps_own_copy = False``.

    ``swap`` (set by the engine, for variants with ``scratch_free = True``): the step keeps no copy of the weights.
    ``saved`` then holds the parameters' own tensors, which nothing writes to; :meth:`Variant.apply_` builds
    ``w + e`` in the gradient tensors and points the parameters at them for pass 2 (see :func:`point_at_`), and
    :meth:`Variant.restore_` points them back.
    """

    names: list[str]
    params: list[Tensor]
    grads: list[Tensor]
    saved: list[Tensor]
    ascent: int = 0
    step: int = 0
    evaluate: Callable[[], Tensor] | None = None
    evaluate_clobbers_grads: bool = False
    measure: bool = True  # apply_ computes ||e|| (the adapters ask for it on logging steps only)
    swap: bool = False  # no saved copy: w + e is built in the gradients and swapped in (see above)
    reduction: ShardedReduction | None = None  # sharded parameters: reductions run over every rank's shard

    def norm(self, tensors: Sequence[Tensor]) -> Tensor:
        """The global L2 norm of ``tensors`` (one per parameter of the step, in step order): over the whole
        parameters when they are sharded (FSDP2, tensor parallel), where the lists hold this rank's shards.
        Variants take every norm of a per-parameter list through here."""
        if self.reduction is None:
            return global_norm(tensors)
        return self.reduction.norm(tensors)

    def dot(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        """``<a, b>`` over per-parameter lists in step order (global over shards, as :meth:`norm`), in their
        :func:`~lightning_sam.tensor_ops.accumulation_dtype`."""
        if self.reduction is not None:
            return self.reduction.dot(a, b)
        dtype = accumulation_dtype(list(a) + list(b))
        return torch.stack([torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)) for x, y in zip(a, b)]).sum()


def point_at_(params: Sequence[Tensor], tensors: Sequence[Tensor], *, drop_grads: bool = False) -> None:
    """Make each parameter use the memory of its tensor (``p.data = t``: the same parameter object, its optimizer
    state and autograd hooks unchanged); with ``drop_grads``, also ``p.grad = None``. One attribute store per tensor
    and no kernel: cheaper than a copy for all but tiny tensors."""
    for p, t in zip(params, tensors):
        p.data = t
        if drop_grads:
            p.grad = None


class Variant:
    """Base class of a SAM variant. Subclasses give their ``name`` and ``default_rho`` as class keywords
    (``class XSAM(Variant, name="xsam", default_rho=0.15)``), take their options as keyword arguments of ``__init__``
    (typed, with defaults, validated there) and implement ``direction_``."""

    name: ClassVar[str] = ""
    default_rho: ClassVar[float] = 0.05
    per_rank_state: bool = False  # state differs between DDP ranks (checkpointed for every rank); may be per instance
    # direction_ never writes step.params (only the gradients and the variant's own state): the engine may then run
    # the step without a saved copy (StepTensors.swap); may be per instance. descent_ may still use step.params as
    # scratch: they hold w + e then, which the restore discards either way
    scratch_free: bool = False
    # registered sparse=True: save_/restore_ keep their own copy, so the engine allocates none (step.saved = []);
    # an instance that uses the engine's whole copy after all (SSAM's storage="dense") sets it False
    keeps_own_copy: bool = True
    setup_message: str = ""  # one line the adapters log at setup (e.g. BAR's pairs)
    sample_batch_size: int = 1  # samples per micro-batch of per-sample gradients (SSAM's fisher_batch_size)
    sharded: bool = False  # set by the engine: the tensors are this rank's shards of DTensors (FSDP2, TP)
    # set by the engine before bind() when sharded: the DTensor parameters (bind's tensors are their local shards;
    # gradients are read from these) and the reduction over all of them, in bind's order
    shard_sources: list[Tensor] | None = None
    reduction: ShardedReduction | None = None
    supports_sharding: bool = True  # False: the engine refuses sharded parameters (the reason in sharding_message)
    sharding_message: str = ""

    def __init_subclass__(cls, name: str = "", default_rho: float | None = None, **kwargs: Any) -> None:
        """``class XSAM(Variant, name="xsam", default_rho=0.15)``: the name users type and the default radius."""
        super().__init_subclass__(**kwargs)
        if name:
            cls.name = name
        if default_rho is not None:
            cls.default_rho = default_rho

    def __new__(cls, *args: Any, **kwargs: Any) -> Variant:
        variant = super().__new__(cls)
        signature = inspect.signature(cls.__init__)
        bound = signature.bind(variant, *args, **kwargs)
        # what the user gave, less the values equal to a default (LightningCLI passes every default explicitly)
        variant._config = {
            k: v for k, v in list(bound.arguments.items())[1:] if not _is_default(v, signature.parameters[k].default)
        }
        return variant

    @property
    def config(self) -> dict[str, Any]:
        """The options this variant was built with (only those given; ``rho`` included when given)."""
        return dict(self._config)

    def with_options(self, **options: Any) -> Variant:
        """A fresh, unbound variant of the same class with this one's options updated by ``options``."""
        return type(self)(**{**self._config, **options})

    def __init__(self, rho: float | None = None) -> None:
        hint = f"; pass rho=None for the default ({self.default_rho})."
        self.rho = check.real(self.name, "rho", self.default_rho if rho is None else rho, "> 0", hint)
        self.all_reduce_sum_: Callable[[Tensor], Tensor] = all_reduce_sum_
        self.refresh_seconds = 0.0  # wall time of refresh work (masks, statistics) since it was last reported

    def set_all_reduce(self, all_reduce_sum_: Callable[[Tensor], Tensor]) -> None:
        """The in-place SUM over ranks that refreshes use so that every rank derives the same state (DDP)."""
        self.all_reduce_sum_ = all_reduce_sum_

    def sum_tensors_over_ranks_(self, tensors: list[Tensor]) -> None:
        """Sum ``tensors`` over ranks in place, through one flat buffer (one all-reduce) in their
        :func:`~lightning_sam.tensor_ops.accumulation_dtype` (fp32, or fp64 when any is fp64); nothing to do on a
        single process, nor on sharded parameters: there each rank holds its own slice of values that are already
        global (FSDP reduce-scatters every backward), so there are no replicas to bring into agreement."""
        if world_size() == 1 or self.sharded:
            return
        dtype = accumulation_dtype(tensors)
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        self.all_reduce_sum_(flat)
        for t, part in zip(tensors, torch.split(flat, [t.numel() for t in tensors])):
            t.copy_(part.reshape(t.shape))

    # ----------------------------------------------------------------- the rule
    def direction_(self, step: StepTensors) -> Tensor:
        """Overwrite ``step.grads`` with the unnormalized ascent direction ``u``; return ``n`` (0-dim, in the
        :func:`~lightning_sam.tensor_ops.accumulation_dtype` of the gradients: fp32, or fp64 for fp64 ones).

        The engine then sets ``w <- w + rho * u / (n + eps)``. ``step.params`` hold the current point on entry and
        must hold it again on return (at the first ascent, ``step.ascent == 0``, that point equals ``step.saved``).
        """
        raise RuntimeError(
            f"{type(self).__name__} is registered with second_pass=False: it never ascends, so the engine never asks "
            "it for a direction (register_variant refuses a second_pass variant without one)"
        )

    def descent_(self, step: StepTensors) -> None:
        """Optionally replace the descent gradient ``step.grads`` (pass-2 gradients) in place. Identity here."""
        return None

    def plain_step_(self, step: StepTensors) -> None:
        """On a step without pass 2: optionally change the descent gradient ``step.grads`` (pass 1's) in place."""
        return None

    @property
    def ascent_steps(self) -> int:
        """Ascent passes per step (1; multi-step variants ascend again after each extra pass)."""
        return 1

    def needs_second_pass(self, step_index: int) -> bool:
        """Whether optimizer step ``step_index`` (0-based) runs the ascent and pass 2. Always, by default."""
        return True

    # ----------------------------------------------------------------- mechanics a variant may override
    def bind(self, names: list[str], params: list[Tensor]) -> None:
        """Called once by the engine with every parameter it manages (names key the variant's state)."""
        return None

    @classmethod
    def run_defaults(cls, options: dict[str, Any], run: RunLength) -> dict[str, Any]:
        """Options the Lightning adapters fill in from the run's length when the user did not give them.

        ``options`` are the user's; return only options missing there. Raise (through ``run.epoch`` /
        ``run.total``) when a missing option needs a length the run cannot tell, naming the option to pass.
        """
        return {}

    def save_(self, step: StepTensors) -> None:
        """Before the first ascent of a step: keep what :meth:`restore_` copies back. Dense copy by default; with
        ``step.swap``, no copy: ``saved`` becomes the parameters' current tensors (new handles on the same memory)."""
        if step.swap:
            step.saved = [p.data for p in step.params]
        else:
            torch._foreach_copy_(step.saved, step.params)

    def apply_(self, step: StepTensors) -> Tensor | None:
        """Add the perturbation ``e`` (already in ``step.grads``) to the weights; return ``||e||`` (fp32, or fp64
        for fp64 tensors) when ``step.measure``, else None. With ``step.swap``: ``grads <- grads + w`` (the same
        rounding as ``w + e``), then the parameters point at the gradient tensors, which they take over (their
        ``.grad`` is set to None)."""
        norm = step.norm(step.grads) if step.measure else None
        if step.swap:
            torch._foreach_add_(step.grads, step.params)
            point_at_(step.params, step.grads, drop_grads=True)
        else:
            torch._foreach_add_(step.params, step.grads)
        return norm

    def restore_(self, step: StepTensors) -> None:
        """Copy the saved weights back, bit-exactly (``step.swap``: point the parameters back at their own,
        untouched tensors)."""
        if step.swap:
            point_at_(step.params, step.saved)
        else:
            torch._foreach_copy_(step.params, step.saved)

    def samples_needed(self, step_index: int) -> int:
        """How many training samples the variant still wants this step (SSAM's Fisher); 0 for none."""
        return 0

    def add_squared_gradients_(self, squared: list[Tensor], count: int, step_index: int) -> None:
        """Receive the sum over ``count`` samples of squared per-sample gradients (one tensor per parameter)."""
        return None

    def before_optimizer_step_(
        self, step_index: int, learning_rates: dict[str, float | Tensor], skip: Tensor | None
    ) -> None:
        """Right before the optimizer step, after the descent gradient is final (BAR's decoupled rescaling).

        ``learning_rates`` maps each parameter name to its param group's current learning rate; ``skip`` is a
        0-dim tensor, 1.0 when the optimizer will skip this step (non-finite gradients under GradScaler), or None.
        Only called for variants that override it.
        """
        return None

    def metrics(self) -> dict[str, Tensor]:
        """Extra values to log (e.g. mask density), as tensors; empty by default."""
        return {}

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Per-variant state keyed by parameter name (empty for stateless rules)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{self.name} has no state, got keys {sorted(state)}")

    def extra_repr(self) -> str:
        return f"rho={self.rho}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
