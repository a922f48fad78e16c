"""A variant written outside the package, as a user would: one file, one ``register_variant`` line.

``e = rho * u / ||u||`` with ``u = sign(g) * |g| ** power``: SAM for ``power = 1``; a flatter direction below 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sam import validation
from lightning_sam.variants import StepTensors, Variant, VariantInfo


class PowerSAM(Variant):
    """``u = sign(g) * |g| ** power``.

    Args:
        rho: neighbourhood radius (default 0.05).
        power: the exponent applied to ``|g|`` (default 1.0: SAM), > 0.
    """

    name = "powersam"
    default_rho = 0.05

    def __init__(self, rho: float | None = None, power: float = 1.0) -> None:
        super().__init__(rho)
        self.power = validation.real("powersam", "power", power, "> 0")

    def direction_(self, step: StepTensors) -> Tensor:
        with torch.no_grad():
            for g in step.grads:
                g.copy_(torch.sign(g) * g.abs() ** self.power)
        return step.norm(step.grads)


INFO = VariantInfo(PowerSAM)  # the one registry line: register_variant(INFO)


def reference_direction(grads: list[Tensor], rho: float, power: float) -> list[Tensor]:
    """The same rule, written plainly per tensor (the test's oracle)."""
    directions = [torch.sign(g) * g.abs() ** power for g in grads]
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in directions)).float()
    return [rho * d / (norm + 1e-12) for d in directions]
