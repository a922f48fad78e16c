"""BAR, balancedness-aware regularization (Li, Zhang & He, NeurIPS 2024).

For two-factor (scale-invariant) layers such as LoRA, ``W = W0 + s * B @ A``, SAM implicitly drives the
*balancedness* ``b = ½(||A||² − ||B||²)`` of each pair toward 0. BAR does it explicitly and cheaply: no second
pass, only a decoupled multiplicative rescaling of each pair right before the optimizer step (like AdamW's
weight decay: not a loss term, not a gradient term). With ``c = alpha_t * lr`` (``lr`` of the param group that
holds ``A``), per pair::

    nBAR (default):  if ||g_A|| >= ||g_B||:  A *= (1 + c);  B *= (1 - c)   else:  A *= (1 - c);  B *= (1 + c)
    oBAR:            if ||A|| >= ||B||:      A *= (1 - c);  B *= (1 + c)   else:  A *= (1 + c);  B *= (1 - c)
    alpha_t = mu0 * s(t / T),  s = linear 1 - u (default) | cosine ½(1 + cos πu) | constant 1

``t = 0, 1, ...`` is the index of the optimizer step (skipped GradScaler steps count), ``T`` the total number of
optimizer steps (``u`` is clipped to 1 past ``T``). Norms are Frobenius, per pair, in fp32 (fp64 when the
factors are fp64; the factors ``1 ± c`` are formed in that dtype too). A pair whose two
gradient norms are both 0 (or that has no gradient at all) is left alone, for either rule. A step the optimizer
skips (``skip == 1``) rescales nothing, without a host sync. Every other trained parameter gets a plain step.

Sharded parameters (FSDP2, tensor parallel): each rank holds a slice of each factor. The pair norms (and the logged
balancedness) are those of the whole tensors: the local squared norms of every factor, stacked, are summed over the
ranks by one all-reduce per step (:meth:`~lightning_sam.sharding.ShardedReduction.totals`, each coordinate counted
once), so every rank takes the same decision; the rescaling itself is elementwise on the local shards.

``rho`` has no meaning here (nothing is perturbed): leave it unset; a given ``rho`` raises.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_sam import validation as check
from lightning_sam.sharding import ShardedReduction, local
from lightning_sam.tensor_ops import accumulation_dtype
from lightning_sam.variants.base import RunLength, Variant

log = logging.getLogger(__name__)

SCHEDULES = ("linear", "cosine", "constant")
RULES = ("nbar", "obar")

# peft's LoraLayer keeps its factors in ModuleDicts ``lora_A`` / ``lora_B`` keyed by adapter name (Linear, Conv,
# MultiheadAttention, ...: ``<prefix>.lora_A.<adapter>.weight``) and, for Embedding, in ParameterDicts
# ``lora_embedding_A`` / ``lora_embedding_B`` (``<prefix>.lora_embedding_A.<adapter>``). Module names never contain
# a dot, so an adapter name is one path component.
_PEFT_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(?P<prefix>(?:.*\.)?)lora_A\.(?P<adapter>[^.]+)\.weight$"), "{prefix}lora_B.{adapter}.weight"),
    (re.compile(r"^(?P<prefix>(?:.*\.)?)lora_embedding_A\.(?P<adapter>[^.]+)$"), "{prefix}lora_embedding_B.{adapter}"),
)

PairsOption = Sequence[tuple[Any, Any]] | Callable[[list[str], list[Tensor]], Sequence[tuple[str, str]]] | None


def peft_lora_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """``(name_A, name_B)`` of every peft LoRA pair (every adapter; Linear, Conv and Embedding) among ``names``.

    A factor whose partner is not in ``names`` (e.g. not trained by the optimizer) is not paired.
    """
    present = set(names)
    pairs = []
    for name in names:
        for pattern, partner in _PEFT_PATTERNS:
            match = pattern.match(name)
            if match is not None:
                other = partner.format(**match.groupdict())
                if other in present:
                    pairs.append((name, other))
                break
    return pairs


def _schedule_value(schedule: str, u: float) -> float:
    if schedule == "linear":
        return 1.0 - u
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * u))
    return 1.0


class _DeviceGroup:
    """The pairs that live on one device: their factors as one flat list ``[A_1..A_P, B_1..B_P]``.

    Sharded parameters: ``factors`` are the local shards, ``sources`` the parameters they are shards of (DTensors,
    or plain tensors every rank holds; their ``.grad`` is read), ``reduction`` sums per-factor partial sums over the
    ranks and ``reduction2`` the same over ``factors + factors`` (oBAR: gradient and weight norms in one all-reduce).
    """

    def __init__(
        self,
        device: torch.device,
        positions: list[int],
        a: list[Tensor],
        b: list[Tensor],
        sources: list[Tensor] | None = None,
        reduction: ShardedReduction | None = None,
        reduction2: ShardedReduction | None = None,
    ) -> None:
        self.device = device
        self.positions = positions  # indices into BAR.found_pairs
        self.size = len(a)
        self.factors = a + b
        self.sources = sources
        self.reduction = reduction
        self.reduction2 = reduction2
        self.zero = torch.zeros((), dtype=torch.float32, device=device)  # a missing gradient's norm (dtype: _rescale_)

    def grads(self) -> list[Tensor | None]:
        """The factors' gradients (sharded: the local shards of the parameters' gradients)."""
        if self.sources is None:
            return [p.grad for p in self.factors]
        return [None if s.grad is None else local(s.grad) for s in self.sources]


class BAR(Variant, name="bar"):  # rho is unused: BAR never perturbs
    """Balancedness-aware regularization of two-factor pairs ``(A, B)``, no second pass.

    Args:
        rho: not used by BAR (nothing is perturbed); must be left ``None``.
        mu0: the coefficient ``mu0`` of ``alpha_t = mu0 * s(t / T)``, finite and >= 0 (default 1.0; the paper's
            grid is {0.5, 1, 2} for RoBERTa-large with AdamW at lr 1e-4…5e-4).
        schedule: ``s``: ``"linear"`` ``1 - u`` (default), ``"cosine"`` ``½(1 + cos πu)``, ``"constant"`` 1.
        rule: ``"nbar"`` (default; compares the gradient norms of the pair) or ``"obar"`` (compares the weights).
        total_steps: ``T``, the total number of optimizer steps (the Lightning adapters fill it in from the
            Trainer's estimated stepping batches; required by ``SAMEngine`` unless ``schedule="constant"``).
        pairs: which parameters form pairs. ``None`` (default): every peft LoRA pair found from the parameter
            names (``...lora_A.<adapter>.weight`` with ``...lora_B.<adapter>.weight``, ``...lora_embedding_A.
            <adapter>`` with ``...lora_embedding_B.<adapter>``). Or a list of ``(A, B)`` given as tensors (matched
            by identity to the trained parameters) or as parameter names. Or a callable ``(names, params) ->
            [(name_A, name_B), ...]`` for any other two-factor layer.

    After ``bind``, ``found_pairs`` lists the ``(name_A, name_B)`` pairs and ``setup_message`` describes them in
    one line (the adapters log it). No pairs raises ``ValueError``.

    Sharded parameters (FSDP2, tensor parallel): the pair norms and the logged balancedness are global (one
    all-reduce of the stacked squared shard norms per step); the rescaling is elementwise on each rank's shards.

    State: ``step``, the number of optimizer steps seen (``t`` of the next step). ``T`` is an option, not state:
    give ``total_steps`` explicitly when a resumed run would otherwise derive another ``T`` from its Trainer.
    """

    def __init__(
        self,
        rho: float | None = None,
        mu0: float = 1.0,
        schedule: str = "linear",
        rule: str = "nbar",
        total_steps: int | None = None,
        pairs: PairsOption = None,
    ) -> None:
        if rho is not None:
            raise ValueError(
                f"bar: rho has no meaning for BAR (it rescales (A, B) pairs and perturbs nothing), got rho={rho!r}; "
                "leave rho unset (None)."
            )
        super().__init__(None)
        mu0 = check.real("bar", "mu0", mu0, ">= 0", " (default 1.0)")
        check.choice("bar", "schedule", schedule, SCHEDULES)
        check.choice("bar", "rule", rule, RULES)
        if total_steps is not None:
            check.integer("bar", "total_steps", total_steps, 1)
        if pairs is not None and not callable(pairs):
            if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
                raise ValueError(
                    "bar: pairs must be None (peft LoRA discovery), a list of (A, B) tensors or names, or a callable "
                    f"(names, params) -> [(name_A, name_B), ...]; got {type(pairs).__name__}"
                )
            for pair in pairs:
                if not (
                    isinstance(pair, (tuple, list))
                    and len(pair) == 2
                    and (all(isinstance(x, Tensor) for x in pair) or all(isinstance(x, str) for x in pair))
                ):
                    raise ValueError(f"bar: each entry of pairs must be (A, B), two tensors or two names; got {pair!r}")
        self.mu0 = float(mu0)
        self.schedule = schedule
        self.rule = rule
        self.total_steps = total_steps
        self.pairs = pairs
        self.steps = 0  # optimizer steps seen: t of the next step
        self.found_pairs: list[tuple[str, str]] = []
        self._groups: list[_DeviceGroup] = []

    @classmethod
    def run_defaults(cls, options: dict[str, Any], run: RunLength) -> dict[str, Any]:
        schedule = options.get("schedule", "linear")
        if schedule == "constant" or options.get("total_steps") is not None:
            return {}
        what = f"its {schedule} schedule needs the run length"
        return {"total_steps": max(1, run.total("bar", what, "total_steps"))}

    # ----------------------------------------------------------------- setup
    def bind(self, names: list[str], params: list[Tensor]) -> None:
        index = {name: i for i, name in enumerate(names)}
        if self.pairs is None:
            named = peft_lora_pairs(names)
            how = "peft LoRA names"
        elif callable(self.pairs):
            named = [tuple(pair) for pair in self.pairs(list(names), list(params))]  # type: ignore[misc]
            how = "pairs=<callable>"
            for pair in named:
                if len(pair) != 2 or not all(isinstance(x, str) for x in pair):
                    raise ValueError(f"bar: the pairs callable must return (name_A, name_B) pairs, got {pair!r}")
        else:
            by_id = {id(p): name for name, p in zip(names, params)}
            named = []
            for a, b in self.pairs:
                pair = []
                for x in (a, b):
                    name = by_id.get(id(x)) if isinstance(x, Tensor) else x
                    if name is None:
                        raise ValueError(
                            f"bar: a tensor of shape {tuple(x.shape)} in pairs= is not among the trained parameters "
                            "(is it in the optimizer, with requires_grad and not in a sam_exclude group?)"
                        )
                    pair.append(name)
                named.append(tuple(pair))
            how = "pairs=[...]"
        seen: set[str] = set()
        for a, b in named:
            for name in (a, b):
                if name not in index:
                    raise ValueError(f"bar: {name!r} in pairs is not among the trained parameters")
                if name in seen:
                    raise ValueError(f"bar: parameter {name!r} appears in more than one pair (or twice in one)")
                seen.add(name)
        if not named:
            raise ValueError(
                f"bar: no (A, B) pairs found among the {len(names)} trained parameters (searched: {how}). BAR finds "
                "peft LoRA layers by their names (...lora_A.<adapter>.weight / ...lora_B.<adapter>.weight, "
                "...lora_embedding_A.<adapter> / ...lora_embedding_B.<adapter>); for any other two-factor layer pass "
                "pairs=[(A, B), ...] (tensors or names) or pairs=callable(names, params) -> [(name_A, name_B), ...]."
            )
        self.found_pairs = [(a, b) for a, b in named]  # type: ignore[misc]
        by_device: dict[torch.device, list[int]] = {}
        for k, (a, _) in enumerate(self.found_pairs):
            by_device.setdefault(params[index[a]].device, []).append(k)
        sharded = self.sharded and self.shard_sources is not None and self.reduction is not None
        self._groups = []
        for device, positions in by_device.items():
            a_params = [params[index[self.found_pairs[k][0]]] for k in positions]
            b_params = [params[index[self.found_pairs[k][1]]] for k in positions]
            for k, p in zip(positions, b_params):
                if p.device != device:
                    raise ValueError(f"bar: the factors of pair {self.found_pairs[k]} live on different devices")
            group = _DeviceGroup(device, positions, a_params, b_params)
            if sharded:  # bind's tensors are local shards; gradients and reductions come from the parameters
                order = [index[self.found_pairs[k][0]] for k in positions]
                order += [index[self.found_pairs[k][1]] for k in positions]
                group.sources = [self.shard_sources[i] for i in order]  # type: ignore[index]
                group.reduction = self.reduction.subset(order)  # type: ignore[union-attr]
                group.reduction2 = self.reduction.subset(order + order)  # type: ignore[union-attr]
            self._groups.append(group)
        if self.schedule != "constant" and self.total_steps is None:
            raise ValueError(
                f"bar: schedule={self.schedule!r} needs total_steps=... (T, the number of optimizer steps; "
                "SAMCallback and SAMMixin set it from the Trainer), or use schedule='constant'"
            )
        log.info(self.setup_message)

    @property
    def setup_message(self) -> str:
        """One line for the adapters to log once at setup: how many pairs, and which."""
        shown = ", ".join(f"({a}, {b})" for a, b in self.found_pairs[:4])
        more = f", ... ({len(self.found_pairs) - 4} more)" if len(self.found_pairs) > 4 else ""
        return (
            f"BAR ({self.rule}, mu0={self.mu0}, {self.schedule}) rescales {len(self.found_pairs)} pairs: {shown}{more}"
        )

    # ----------------------------------------------------------------- the rule
    def alpha(self, step_index: int) -> float:
        """``alpha_t = mu0 * s(t / T)`` for optimizer step ``t = step_index`` (``u`` clipped to 1)."""
        if self.schedule == "constant":
            return self.mu0
        u = min(step_index / self.total_steps, 1.0) if self.total_steps else 1.0
        return self.mu0 * _schedule_value(self.schedule, max(u, 0.0))

    @torch.no_grad()
    def before_optimizer_step_(
        self, step_index: int, learning_rates: dict[str, float | Tensor], skip: Tensor | None
    ) -> None:
        self.steps = step_index + 1
        if not self._groups:
            raise RuntimeError("bar: bind() was not called (the engine binds the variant to its parameters)")
        alpha = self.alpha(step_index)
        if alpha == 0.0:
            return
        for group in self._groups:
            try:
                coefficients = [alpha * learning_rates[self.found_pairs[k][0]] for k in group.positions]
            except KeyError as missing:
                raise RuntimeError(
                    f"bar: no learning rate for {missing}: is it in the optimizer's param groups?"
                ) from None
            self._rescale_(group, coefficients, skip)

    def _rescale_(self, group: _DeviceGroup, coefficients: list[float | Tensor], skip: Tensor | None) -> None:
        """Multiply ``A`` by ``1 + sign * c`` and ``B`` by ``1 - sign * c`` (sign ±1, or 0 when left alone)."""
        size = group.size
        grads = group.grads()
        present = [g for g in grads if g is not None]
        if not present and group.reduction is None:
            return  # no gradient at all: every pair is left alone (sharded: every rank joins the all-reduce)
        # Norms, signs and factors in at least fp32 (fp64 for fp64 factors), read at each step: the module may be
        # converted (e.g. precision="64-true") after bind.
        dtype = accumulation_dtype(group.factors)
        if group.zero.dtype != dtype:
            group.zero = torch.zeros((), dtype=dtype, device=group.device)
        computed = iter(torch._foreach_norm(present, 2, dtype=dtype) if present else [])
        grad_norms = torch.stack([group.zero if g is None else next(computed) for g in grads])
        weights: Tensor | None = None
        if group.reduction is not None:
            # global squared norms (monotone in the norms: the comparisons below are unchanged), one all-reduce
            if self.rule == "obar":
                local_norms = torch.cat([grad_norms, torch.stack(torch._foreach_norm(group.factors, 2, dtype=dtype))])
                squares = group.reduction2.totals(local_norms * local_norms)  # type: ignore[union-attr]
                grad_norms, weights = squares[: 2 * size], squares[2 * size :]
            else:
                grad_norms = group.reduction.totals(grad_norms * grad_norms)
        norm_a, norm_b = grad_norms[:size], grad_norms[size:]
        active = (norm_a > 0) | (norm_b > 0)
        if self.rule == "nbar":
            sign = torch.where(norm_a >= norm_b, 1.0, -1.0).to(dtype)  # no-op for fp32
        else:
            if weights is None:
                weights = torch.stack(torch._foreach_norm(group.factors, 2, dtype=dtype))
            sign = torch.where(weights[:size] >= weights[size:], -1.0, 1.0).to(dtype)
        sign = sign * active
        if skip is not None:
            sign = sign * (1.0 - skip.to(device=group.device, dtype=dtype).reshape(()))
        if not any(isinstance(c, Tensor) for c in coefficients):  # Python numbers: no host-device copy
            if all(c == coefficients[0] for c in coefficients):
                scaled = sign * coefficients[0]  # the usual case: one learning rate for every pair
            else:
                scaled = torch.stack(torch._foreach_mul(list(sign.unbind()), coefficients))  # type: ignore[arg-type]
        else:  # tensor learning rates (e.g. capturable optimizers): stay on the device
            rates = [torch.as_tensor(c, dtype=dtype).to(group.device).reshape(()) for c in coefficients]
            scaled = sign * torch.stack(rates)
        factors = torch.cat([1.0 + scaled, 1.0 - scaled])
        torch._foreach_mul_(group.factors, list(factors.unbind()))

    # ----------------------------------------------------------------- logging
    @torch.no_grad()
    def balancedness(self) -> Tensor:
        """``|½(||A||² − ||B||²)|`` of every pair (fp32, fp64 when a factor is fp64; in ``found_pairs`` order, on
        the first pair's device). Sharded parameters: of the whole factors (one all-reduce; every rank calls it)."""
        if not self._groups:
            raise RuntimeError("bar: bind() was not called")
        parts, order = [], []
        target = self._groups[0].device
        for group in self._groups:
            norms = torch.stack(torch._foreach_norm(group.factors, 2, dtype=accumulation_dtype(group.factors)))
            squares = norms * norms
            if group.reduction is not None:
                squares = group.reduction.totals(squares)
            parts.append((0.5 * (squares[: group.size] - squares[group.size :])).abs().to(target))
            order.extend(group.positions)
        values = torch.cat(parts)
        if len(self._groups) == 1:
            return values
        return values[torch.tensor(order).argsort().to(target)]

    def metrics(self) -> dict[str, Tensor]:
        if not self._groups:
            return {}
        values = self.balancedness()
        return {"sam/balancedness_mean": values.mean(), "sam/balancedness_max": values.max()}

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """``{"step": optimizer steps seen}``."""
        return {"step": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self.steps = 0
            return
        if set(state) != {"step"}:
            raise ValueError(f"bar: expected state keys ['step'], got {sorted(state)}")
        self.steps = int(state["step"])

    def extra_repr(self) -> str:
        return f"mu0={self.mu0}, schedule={self.schedule!r}, rule={self.rule!r}, total_steps={self.total_steps}"
