"""The variant registry: the names users type, mapped to their rules and what each rule does beyond SAM's ascent.

Adding a variant is one file in this folder and one ``VariantInfo`` line in ``_REGISTRY`` (or, outside the package,
one :func:`register_variant` call). The engine and the adapters read the capabilities from the entry; they never
discover them from the class.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from lightning_sam.variants.bar import BAR
from lightning_sam.variants.base import RunLength, StepTensors, Variant
from lightning_sam.variants.fsam import FSAM
from lightning_sam.variants.looksam import LookSAM
from lightning_sam.variants.sam import ASAM, SAM
from lightning_sam.variants.ssam import SSAM
from lightning_sam.variants.xsam import XSAM


@dataclass(frozen=True)
class VariantInfo:
    """A registered variant and the extension points of :class:`Variant` it uses (all False: plain SAM's shape).

    Attributes:
        cls: the :class:`Variant` subclass (its ``name`` is the registry key).
        second_pass: False for rules that never perturb (BAR): every step is a plain step, ``direction_`` unused.
        descent: ``descent_`` replaces the descent gradient after the last pass (XSAM, LookSAM).
        plain_step: ``plain_step_`` changes the gradient of a step without pass 2 (LookSAM).
        multi_step: ``ascent_steps`` may exceed 1 (XSAM with ``steps=k``).
        probes: ``descent_`` calls ``step.evaluate()`` for side-effect-free losses (XSAM's alpha search).
        sparse: ``save_`` / ``apply_`` / ``restore_`` perturb and save a subset of coordinates (SSAM).
        samples: ``samples_needed`` / ``add_squared_gradients_`` take per-sample gradients (SSAM's Fisher).
        before_step: ``before_optimizer_step_`` acts right before the optimizer step (BAR).
        run_length: ``run_defaults`` derives options from the epoch or run length (SSAM, XSAM, BAR).
    """

    cls: type[Variant]
    second_pass: bool = True
    descent: bool = False
    plain_step: bool = False
    multi_step: bool = False
    probes: bool = False
    sparse: bool = False
    samples: bool = False
    before_step: bool = False
    run_length: bool = False

    def __post_init__(self) -> None:
        if self.second_pass and self.cls.direction_ is Variant.direction_:
            raise TypeError(
                f"{self.cls.__name__} runs a second pass (second_pass=True) but has no direction_: implement it, or "
                "register it with second_pass=False (a pre-step rule, as BAR)"
            )

    @property
    def name(self) -> str:
        return self.cls.name


_REGISTRY: dict[str, VariantInfo] = {
    info.name: info
    for info in (
        VariantInfo(SAM),
        VariantInfo(ASAM),
        VariantInfo(SSAM, sparse=True, samples=True, run_length=True),
        VariantInfo(FSAM),
        VariantInfo(BAR, second_pass=False, before_step=True, run_length=True),
        VariantInfo(XSAM, descent=True, multi_step=True, probes=True, run_length=True),
        VariantInfo(LookSAM, descent=True, plain_step=True),
    )
}


def register_variant(info: VariantInfo) -> None:
    """Register a variant under ``info.cls.name`` (lower case, not taken yet)."""
    name = info.name
    if not name or name != name.lower() or not isinstance(info.cls, type) or not issubclass(info.cls, Variant):
        raise ValueError(f"register_variant needs a Variant subclass with a lower-case name, got {info.cls!r}")
    if name in _REGISTRY and _REGISTRY[name].cls is not info.cls:
        raise ValueError(f"a variant named {name!r} is registered already ({_REGISTRY[name].cls.__name__})")
    _REGISTRY[name] = info


def unregister_variant(name: str) -> None:
    """Remove ``name`` from the registry (for tests and plugins)."""
    _REGISTRY.pop(name, None)


def available_variants() -> list[str]:
    """The names accepted by ``variant=`` (``SAMCallback``, ``SAMMixin``, ``SAMEngine``)."""
    return sorted(_REGISTRY)


def variant_info(variant: str | Variant | type[Variant]) -> VariantInfo:
    """The registry entry of a name, a variant object or a variant class; a clear error when there is none."""
    if isinstance(variant, str):
        if variant.lower() not in _REGISTRY:
            raise ValueError(f"Unknown SAM variant {variant!r}. Available variants: {', '.join(available_variants())}.")
        return _REGISTRY[variant.lower()]
    cls = variant if isinstance(variant, type) else type(variant)
    info = _REGISTRY.get(getattr(cls, "name", ""))
    if info is None or info.cls is not cls:
        raise ValueError(
            f"{cls.__name__} is not a registered variant: register it with "
            "lightning_sam.variants.register_variant(VariantInfo(...)), declaring its extension points."
        )
    return info


def variant_class(name: str) -> type[Variant]:
    """The class registered under ``name``; a clear error listing the known names otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"Unknown SAM variant {name!r}. Available variants: {', '.join(available_variants())}.")
    return variant_info(name).cls


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
    return cls(rho=rho, **options) if rho is not None else cls(**options)


def resolve_variant(variant: str | Variant, rho: float | None = None, **options: Any) -> Variant:
    """``variant`` as a variant object (validated): built from a name and options, or the object itself (which then
    carries its own ``rho`` and options)."""
    if isinstance(variant, Variant):
        variant_info(variant)  # registered?
        if rho is not None or options:
            given = sorted([*options, *(["rho"] if rho is not None else [])])
            raise TypeError(
                f"variant={variant!r} is a variant object: give its options to it, not here ({given}), e.g. "
                f"{type(variant).__name__}(rho=..., ...)."
            )
        return variant
    return make_variant(variant, rho, **options)


__all__ = [
    "ASAM",
    "BAR",
    "FSAM",
    "SAM",
    "SSAM",
    "XSAM",
    "LookSAM",
    "RunLength",
    "StepTensors",
    "Variant",
    "VariantInfo",
    "available_variants",
    "make_variant",
    "register_variant",
    "resolve_variant",
    "unregister_variant",
    "variant_class",
    "variant_info",
    "variant_options",
]
