"""Plain, loop-per-parameter reference implementations written from ../shared/ALGORITHMS.md.

Deliberately simple and independent of ``lightning_sam``'s engine: the test suite's oracle. Every function
works on Python lists of tensors, one parameter at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

EPS = 1e-12


def l2_norm(tensors: Iterable[Tensor]) -> Tensor:
    """sqrt(sum of squares) over all tensors, accumulated in fp32."""
    total = torch.zeros((), dtype=torch.float32)
    for t in tensors:
        total = total + (t.detach().float() ** 2).sum()
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
            g = g.detach().float()
            if name not in self.ema:
                self.ema[name] = g.clone()
                directions.append(g.clone())
            else:
                m = self.ema[name]
                directions.append(g - self.sigma * m)
                self.ema[name] = self.lmbda * m + (1 - self.lmbda) * g
        self.steps += 1
        if self.adaptive:
            weights = [p.detach().float() for p in params]
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
        self.generator = torch.Generator().manual_seed(seed)
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
            self.mask = set(torch.randperm(self.total, generator=self.generator)[:k].tolist())

    # -- selection
    def _flat(self, tensors):
        values = []
        for t in tensors:
            values.extend(t.detach().reshape(-1).float().tolist())
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
        grown = [dead[j] for j in torch.randperm(len(dead), generator=self.generator)[:k].tolist()]
        self.mask = (self.mask - dropped) | set(grown)

    def perturbation(self, step, grads):
        if self.kind == "dst" and self.sparsity > 0 and step > 0 and step % self.mask_every == 0:
            self._dst_refresh(step, grads)
        norm = l2_norm(grads)
        result, offset = [], 0
        for g in grads:
            dense = torch.zeros(g.numel())
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
