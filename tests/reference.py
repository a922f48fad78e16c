"""Plain, loop-per-parameter reference implementations written from ../shared/ALGORITHMS.md.

Deliberately simple and independent of ``lightning_sam``'s engine: the test suite's oracle. Every function
works on Python lists of tensors, one parameter at a time. Dtype-generic: norms and state are computed in at least
fp32 (fp64 for fp64 models), so an fp64 run is an fp64 oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_sam.sharded_selection import random_keys

EPS = 1e-12


def wide(t: Tensor) -> Tensor:
    """``t`` in at least fp32: fp16 / bf16 / fp32 -> fp32, fp64 stays fp64 (the library's precision rule)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def l2_norm(tensors: Iterable[Tensor]) -> Tensor:
    """sqrt(sum of squares) over all tensors, accumulated in fp32 (fp64 as soon as one tensor is fp64)."""
    total = torch.zeros((), dtype=torch.float32)
    for t in tensors:
        total = total + (wide(t.detach()) ** 2).sum()
    return total.sqrt()


def sam_perturbation(params: list[Tensor], grads: list[Tensor], rho: float) -> list[Tensor]:
    """SAM: e = rho * g / (||g|| + eps)."""
    norm = l2_norm(grads)
    return [rho * g / (norm + EPS) for g in grads]


def asam_perturbation(params: list[Tensor], grads: list[Tensor], rho: float, eta: float = 0.01) -> list[Tensor]:
    """ASAM: T = |w| + eta, e = rho * T^2 g / (||T g|| + eps)."""
    scales = [p.detach().abs() + eta for p in params]
    norm = l2_norm([t * g for t, g in zip(scales, grads)])
    return [rho * t * t * g / (norm + EPS) for t, g in zip(scales, grads)]


PERTURBATIONS: dict[str, Callable[..., list[Tensor]]] = {"sam": sam_perturbation, "asam": asam_perturbation}


def reference_sam_step(
    model: nn.Module,
    loss_of: Callable[[nn.Module], Tensor],
    optimizer: torch.optim.Optimizer,
    variant: str = "sam",
    rho: float = 0.05,
    **options: float,
) -> tuple[Tensor, Tensor]:
    """One SAM-family step: pass 1, perturb, pass 2, restore by copy, optimizer step. Returns (loss1, loss2)."""
    optimizer.zero_grad()
    loss1 = loss_of(model)
    loss1.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad.detach().clone() for p in params]
    originals = [p.detach().clone() for p in params]
    perturbation = PERTURBATIONS[variant](params, grads, rho, **options)
    with torch.no_grad():
        for p, e in zip(params, perturbation):
            p.add_(e)
    buffers = [b.detach().clone() for b in model.buffers()]  # BatchNorm statistics as pass 1 left them
    optimizer.zero_grad()
    loss2 = loss_of(model)
    loss2.backward()
    with torch.no_grad():
        for p, original in zip(params, originals):
            p.copy_(original)
        for b, original in zip(model.buffers(), buffers):
            b.copy_(original)
    optimizer.step()
    return loss1.detach(), loss2.detach()


class ReferenceFSAM:
    """F-SAM's perturbation with its own EMA state, one parameter at a time (keyed by parameter name).

    t == 1 (or a name seen for the first time): m = g, d = g; later: d = g - sigma m, m = lmbda m + (1 - lmbda) g.
    e = rho d / (||d|| + eps), or with ``adaptive``: e = rho w^2 d / (||w d|| + eps).
    """

    def __init__(self, rho: float = 0.05, sigma: float = 1.0, lmbda: float = 0.9, adaptive: bool = False) -> None:
        self.rho, self.sigma, self.lmbda, self.adaptive = rho, sigma, lmbda, adaptive
        self.ema: dict[str, Tensor] = {}
        self.steps = 0

    def perturbation(self, names: list[str], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        directions = []
        for name, g in zip(names, grads):
            g = wide(g.detach())
            if name not in self.ema:
                self.ema[name] = g.clone()
                directions.append(g.clone())
            else:
                m = self.ema[name]
                directions.append(g - self.sigma * m)
                self.ema[name] = self.lmbda * m + (1 - self.lmbda) * g
        self.steps += 1
        if self.adaptive:
            weights = [wide(p.detach()) for p in params]
            norm = l2_norm([w * d for w, d in zip(weights, directions)])
            return [self.rho * w * w * d / (norm + EPS) for w, d in zip(weights, directions)]
        norm = l2_norm(directions)
        return [self.rho * d / (norm + EPS) for d in directions]


def reference_fsam_step(
    model: nn.Module, loss_of: Callable[[nn.Module], Tensor], optimizer: torch.optim.Optimizer, fsam: ReferenceFSAM
) -> tuple[Tensor, Tensor]:
    """One F-SAM step (``fsam`` carries the EMA between steps), otherwise as :func:`reference_sam_step`."""
    optimizer.zero_grad()
    loss1 = loss_of(model)
    loss1.backward()
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    names, params = [n for n, _ in named], [p for _, p in named]
    originals = [p.detach().clone() for p in params]
    perturbation = fsam.perturbation(names, params, [p.grad for p in params])
    with torch.no_grad():
        for p, e in zip(params, perturbation):
            p.add_(e.to(p.dtype))
    buffers = [b.detach().clone() for b in model.buffers()]
    optimizer.zero_grad()
    loss2 = loss_of(model)
    loss2.backward()
    with torch.no_grad():
        for p, original in zip(params, originals):
            p.copy_(original)
        for b, original in zip(model.buffers(), buffers):
            b.copy_(original)
    optimizer.step()
    return loss1.detach(), loss2.detach()


# ---------------------------------------------------------------------------------------------------- SSAM
class ReferenceSSAM:
    """SSAM written from ALGORITHMS.md ("SSAM in detail") with plain Python loops over coordinates.

    Masks are Python sets of global flat indices over the model's parameters in ``named_parameters`` order.
    Ties: higher score first, then the lower index (the library's documented rule).
    """

    def __init__(self, model, rho=0.05, sparsity=0.5, mask="fisher", pattern="unstructured", n=2, m=4,
                 num_samples=128, mask_every=100, drop_rate=0.5, seed=0, total_steps=None):  # fmt: skip
        self.model, self.rho, self.sparsity = model, rho, sparsity
        self.kind, self.pattern, self.n, self.m = mask, pattern, n, m
        self.num_samples, self.mask_every, self.drop_rate = num_samples, mask_every, drop_rate
        self.total_steps = total_steps
        self.seed, self.draws = seed, 0
        self.shapes = [p.shape for p in model.parameters()]
        self.sizes = [p.numel() for p in model.parameters()]
        self.total = sum(self.sizes)
        self.mask: set[int] | None = None
        self.fisher: list[float] | None = None
        self.seen = 0
        if sparsity == 0 and pattern != "n:m":
            self.mask = set(range(self.total))
        elif mask == "dst":
            k = round(self.total * (1 - sparsity))
            self.mask = set(self._random_order(range(self.total), draw=0)[:k])

    # -- selection
    def _random_order(self, indices, draw):
        """``indices`` in a uniformly random order: by the library's random key of (seed, draw, index), the random
        number generator of DST (as torch.randperm with a seeded generator would be), then by index."""
        indices = list(indices)
        keys = random_keys(torch.tensor(indices, dtype=torch.long), self.seed, draw).tolist()
        return [i for _, i in sorted(zip(keys, indices))]

    def _flat(self, tensors):
        values = []
        for t in tensors:
            values.extend(wide(t.detach().reshape(-1)).tolist())
        return values

    def _select(self, scores):
        keep = 1 - self.sparsity
        if self.pattern == "unstructured":
            k = round(self.total * keep)
            ranked = sorted(range(self.total), key=lambda i: (-scores[i], i))
            return set(ranked[:k])
        offsets = [sum(self.sizes[:j]) for j in range(len(self.sizes))]
        if self.pattern == "structured":
            means = [sum(scores[o : o + s]) / s for o, s in zip(offsets, self.sizes)]
            order = sorted(range(len(self.sizes)), key=lambda j: (-means[j], j))
            chosen, admitted = set(), 0
            for j in order:
                if admitted >= self.total * keep:
                    break
                chosen.update(range(offsets[j], offsets[j] + self.sizes[j]))
                admitted += self.sizes[j]
            return chosen
        chosen = set()  # n:m
        for shape, offset, size in zip(self.shapes, offsets, self.sizes):
            fan_in = size // shape[0] if len(shape) >= 2 else 0
            if len(shape) < 2 or fan_in % self.m:
                chosen.update(range(offset, offset + size))
                continue
            for row in range(shape[0]):
                for group in range(fan_in // self.m):
                    start = offset + row * fan_in + group * self.m
                    members = sorted(range(start, start + self.m), key=lambda i: (-scores[i], i))
                    chosen.update(members[: self.n])
        return chosen

    # -- Fisher, fed one sample at a time at the current weights
    def add_samples(self, step, x, y):
        if self.kind != "fisher" or (self.sparsity == 0 and self.pattern != "n:m"):
            return
        if self.fisher is None and step % self.mask_every != 0:
            return
        if self.fisher is None:
            self.fisher = [0.0] * self.total
        take = min(self.num_samples - self.seen, x.shape[0])
        for i in range(take):
            self.model.zero_grad()
            F.cross_entropy(self.model(x[i : i + 1]), y[i : i + 1]).backward()
            for j, value in enumerate(self._flat([p.grad for p in self.model.parameters()])):
                self.fisher[j] += value * value
        self.model.zero_grad()
        self.seen += take
        if self.seen >= self.num_samples:
            self.mask = self._select(self.fisher)
            self.fisher, self.seen = None, 0

    def _dst_refresh(self, step, grads):
        magnitudes = [abs(v) for v in self._flat(grads)]
        live = sorted(self.mask)
        fraction = self.drop_rate * 0.5 * (1 + math.cos(math.pi * step / self.total_steps))
        k = min(round(fraction * len(live)), self.total - len(live))
        if k <= 0:
            return
        dropped = set(sorted(live, key=lambda i: (magnitudes[i], i))[:k])
        dead = [i for i in range(self.total) if i not in self.mask]
        self.draws += 1
        grown = self._random_order(dead, draw=self.draws)[:k]
        self.mask = (self.mask - dropped) | set(grown)

    def perturbation(self, step, grads):
        if self.kind == "dst" and self.sparsity > 0 and step > 0 and step % self.mask_every == 0:
            self._dst_refresh(step, grads)
        norm = l2_norm(grads)
        result, offset = [], 0
        for g in grads:
            dense = torch.zeros(g.numel(), dtype=g.dtype)
            for i in range(g.numel()):
                if offset + i in self.mask:
                    dense[i] = 1.0
            result.append(self.rho * g * dense.reshape(g.shape) / (norm + EPS))
            offset += g.numel()
        return result


def reference_ssam_run(model, batches, optimizer, ssam: ReferenceSSAM):
    """SSAM training: Fisher samples before pass 1; a plain step while no mask exists; else a masked SAM step."""
    for step, (x, y) in enumerate(batches):
        ssam.add_samples(step, x, y)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if ssam.mask is None:
            optimizer.step()
            continue
        params = list(model.parameters())
        grads = [p.grad.detach().clone() for p in params]
        originals = [p.detach().clone() for p in params]
        perturbation = ssam.perturbation(step, grads)
        with torch.no_grad():
            for p, e in zip(params, perturbation):
                p.add_(e)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)
        optimizer.step()
    return model


# ---------------------------------------------------------------------------------------------------- XSAM
class ReferenceXSAM:
    """XSAM written from ALGORITHMS.md with plain loops; ``alpha`` is its state."""

    def __init__(self, rho=0.15, steps=1, rho_max=None, alpha=1.0, alpha_max=2.0, alpha_step=0.1, alpha_every=None):
        self.rho, self.steps = rho, steps
        self.rho_max = 2 * rho if rho_max is None else rho_max
        self.alpha, self.alpha_every = alpha, alpha_every
        self.grid = [i * alpha_step for i in range(int(alpha_max / alpha_step + 1e-9) + 1)]

    def search_due(self, step):
        if self.alpha_every == 0:
            return False
        return step == 0 if self.alpha_every is None else step % self.alpha_every == 0


def reference_xsam_step(model, loss_of, optimizer, xsam: ReferenceXSAM, step: int):
    optimizer.zero_grad()
    loss_of(model).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    w0 = [p.detach().clone() for p in params]
    buffers = [b.detach().clone() for b in model.buffers()]
    for i in range(xsam.steps):
        if i:
            optimizer.zero_grad()
            loss_of(model).backward()
        grads = [p.grad.detach().clone() for p in params]
        norm = l2_norm(grads)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_((xsam.rho / xsam.steps) * g / (norm + EPS))
    optimizer.zero_grad()
    loss_of(model).backward()
    g_k = [p.grad.detach().clone() for p in params]
    displacement = [p.detach() - w for p, w in zip(params, w0)]
    d_norm = l2_norm(displacement)
    v0 = [d / (d_norm + EPS) for d in displacement]
    g_norm = l2_norm(g_k)
    v1 = [g / (g_norm + EPS) for g in g_k]
    cosine = sum((a * b).sum() for a, b in zip(v0, v1))
    theta = torch.arccos(torch.clamp(cosine, -1.0, 1.0))

    def v(a):
        if torch.sin(theta) < 1e-8:
            return [(x + y) / 2 for x, y in zip(v0, v1)]
        return [(torch.sin((1 - a) * theta) * x + torch.sin(a * theta) * y) / torch.sin(theta) for x, y in zip(v0, v1)]

    if xsam.search_due(step):
        losses = []
        for a in xsam.grid:
            with torch.no_grad():
                for p, w, direction in zip(params, w0, v(a)):
                    p.copy_(w + xsam.rho_max * direction)
                losses.append(loss_of(model).item())
                for b, original in zip(model.buffers(), buffers):
                    b.copy_(original)
        xsam.alpha = xsam.grid[losses.index(max(losses))]
    descent = [g_norm * d for d in v(xsam.alpha)]
    with torch.no_grad():
        for p, w, d in zip(params, w0, descent):
            p.copy_(w)
            p.grad = d.clone()
        for b, original in zip(model.buffers(), buffers):
            b.copy_(original)
    optimizer.step()


# ---------------------------------------------------------------------------------------------- BAR
def bar_alpha(t: int, total_steps: int | None, mu0: float = 1.0, schedule: str = "linear") -> float:
    """alpha_t = mu0 * s(t / T): s = linear 1 - u | cosine ½(1 + cos πu) | constant 1 (u clipped to 1)."""
    if schedule == "constant":
        return mu0
    u = min(t / total_steps, 1.0)
    if schedule == "linear":
        return mu0 * (1.0 - u)
    if schedule == "cosine":
        return mu0 * 0.5 * (1.0 + math.cos(math.pi * u))
    raise ValueError(schedule)


@torch.no_grad()
def reference_bar_rescale(
    pairs: list[tuple[Tensor, Tensor]],
    learning_rates: list[float],
    t: int,
    total_steps: int | None,
    mu0: float = 1.0,
    schedule: str = "linear",
    rule: str = "nbar",
    skip: bool = False,
) -> list[str]:
    """BAR's decoupled rescaling, one pair at a time; returns per pair "A up", "A down" or "alone".

    c = alpha_t * lr (lr of the group holding A). nBAR: ||g_A|| >= ||g_B|| -> A *= 1 + c, B *= 1 - c, else the
    opposite. oBAR: ||A|| >= ||B|| -> A *= 1 - c, B *= 1 + c, else the opposite. Both gradient norms 0 (or no
    gradients): the pair is left alone. A skipped step rescales nothing.
    """
    decisions = []
    alpha = bar_alpha(t, total_steps, mu0, schedule)
    for (a, b), lr in zip(pairs, learning_rates):
        grad_a = wide(a.grad).norm().item() if a.grad is not None else 0.0
        grad_b = wide(b.grad).norm().item() if b.grad is not None else 0.0
        if skip or (grad_a == 0.0 and grad_b == 0.0):
            decisions.append("alone")
            continue
        c = alpha * lr
        # nBAR: A grows when ||g_A|| >= ||g_B||; oBAR: A grows when ||A|| < ||B||
        a_up = grad_a >= grad_b if rule == "nbar" else wide(a).norm().item() < wide(b).norm().item()
        a.mul_(1 + c if a_up else 1 - c)
        b.mul_(1 - c if a_up else 1 + c)
        decisions.append("A up" if a_up else "A down")
    return decisions


def balancedness(pairs: list[tuple[Tensor, Tensor]]) -> list[float]:
    """|½(||A||² − ||B||²)| of each pair."""
    return [abs(0.5 * (wide(a).norm().item() ** 2 - wide(b).norm().item() ** 2)) for a, b in pairs]


def reference_bar_run(
    model: nn.Module,
    batches: list,
    optimizer: torch.optim.Optimizer,
    scheduler,
    pair_names: list[tuple[str, str]],
    total_steps: int | None,
    epochs: int = 1,
    **options,
) -> list[str]:
    """Plain loop: backward, BAR's rescaling with each A's group lr, optimizer.step(), scheduler.step() per step."""
    named = dict(model.named_parameters())
    pairs = [(named[a], named[b]) for a, b in pair_names]
    decisions: list[str] = []
    t = 0
    for _ in range(epochs):
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
            decisions += reference_bar_rescale(pairs, [lr_of[id(a)] for a, _ in pairs], t, total_steps, **options)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            t += 1
    return decisions


# ---------------------------------------------------------------------------------------------------- LookSAM
def reference_looksam_run(model, batches, optimizer, rho=0.05, k=5, alpha=0.7):
    """LookSAM from its definition: a SAM step every k steps keeping g_v, the reuse in between."""
    g_v = None
    for step, batch in enumerate(batches):
        loss_of = cross_entropy_of_batch(batch)
        optimizer.zero_grad()
        loss_of(model).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        g = [p.grad.detach().clone() for p in params]
        if step % k == 0:
            originals = [p.detach().clone() for p in params]
            perturbation = sam_perturbation(params, g, rho)
            with torch.no_grad():
                for p, e in zip(params, perturbation):
                    p.add_(e)
            optimizer.zero_grad()
            loss_of(model).backward()
            g_s = [p.grad.detach().clone() for p in params]
            with torch.no_grad():
                for p, original in zip(params, originals):
                    p.copy_(original)
            dot = sum((a * b).sum() for a, b in zip(g_s, g))
            norm_sq = l2_norm(g) ** 2
            g_v = [s - (dot / (norm_sq + 1e-12)) * x for s, x in zip(g_s, g)]
        elif g_v is not None:
            coefficient = alpha * l2_norm(g) / (l2_norm(g_v) + 1e-12)
            for p, x, v in zip(params, g, g_v):
                p.grad = x + coefficient * v
        optimizer.step()
    return model


def cross_entropy_of_batch(batch):
    x, y = batch
    return lambda model: F.cross_entropy(model(x), y)
