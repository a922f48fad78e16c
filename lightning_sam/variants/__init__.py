"""The variant registry: the names users type, mapped to their rules.

Adding a variant is one file in this folder and one line in ``_REGISTRY``.
"""

from __future__ import annotations

import inspect
from typing import Any

from lightning_sam.variants.bar import BAR
from lightning_sam.variants.base import RunLength, StepTensors, Variant
from lightning_sam.variants.fsam import FSAM
from lightning_sam.variants.looksam import LookSAM
from lightning_sam.variants.sam import ASAM, SAM
from lightning_sam.variants.ssam import SSAM
from lightning_sam.variants.xsam import XSAM

_REGISTRY: dict[str, type[Variant]] = {
    "sam": SAM,
    "asam": ASAM,
    "ssam": SSAM,
    "fsam": FSAM,
    "bar": BAR,
    "xsam": XSAM,
    "looksam": LookSAM,
}


def available_variants() -> list[str]:
    """The names accepted by ``variant=`` (``SAMCallback``, ``SAMMixin``, ``SAMEngine``)."""
    return sorted(_REGISTRY)


def variant_class(name: str) -> type[Variant]:
    """The class registered under ``name``; a clear error listing the known names otherwise."""
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        raise ValueError(f"Unknown SAM variant {name!r}. Available variants: {', '.join(available_variants())}.")
    return _REGISTRY[name.lower()]


def variant_options(name: str) -> dict[str, Any]:
    """The options ``name`` accepts (besides ``rho``) with their defaults."""
    signature = inspect.signature(variant_class(name).__init__)
    return {
        key: param.default
        for key, param in signature.parameters.items()
        if key not in ("self", "rho") and param.kind is not inspect.Parameter.VAR_KEYWORD
    }


def make_variant(name: str, rho: float | None = None, **options: Any) -> Variant:
    """Build the variant ``name``; unknown options raise with the list of accepted ones."""
    cls = variant_class(name)
    accepted = variant_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        hint = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "none"
        raise TypeError(f"Variant {cls.name!r} got unknown option(s) {unknown}. Its options (defaults): {hint}.")
    return cls(rho=rho, **options)


__all__ = [
    "RunLength",
    "StepTensors",
    "Variant",
    "available_variants",
    "make_variant",
    "variant_class",
    "variant_options",
]
