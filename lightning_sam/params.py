"""Which parameters SAM takes part in: the forms ``SAMEngine`` accepts, their names, and the ``params=`` filter
(``"norm"`` for SAM-ON, or a callable). Pure PyTorch."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter


def check_filter(select: Any) -> None:
    """Raise for a ``params=`` filter that is neither None, ``"norm"`` nor a callable."""
    if select is not None and select != "norm" and not callable(select):
        raise ValueError(f"params must be None, 'norm' or a callable (name, parameter) -> bool, got {select!r}")


ParamsLike = Iterable[Parameter] | Iterable[tuple[str, Parameter]] | Iterable[dict[str, Any]]


def named_entries(params: ParamsLike) -> list[tuple[str, Parameter, dict[str, Any]]]:
    """Normalize ``params`` to ``(name, parameter, group options)`` triples.

    Accepts parameters, ``(name, parameter)`` pairs, or param-group dicts (``{"params": [...], "rho": ...,
    "sam_exclude": ...}``, the parameters in a group given either way).
    """
    entries: list[tuple[str, Parameter, dict[str, Any]]] = []

    def add(item: Any, options: dict[str, Any]) -> None:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, param = item
        elif isinstance(item, Tensor):
            name, param = f"param{len(entries)}", item
        else:
            raise TypeError(
                "SAMEngine params must be tensors, (name, tensor) pairs or param-group dicts, "
                f"got {type(item).__name__}"
            )
        if not isinstance(param, Tensor):
            raise TypeError(f"SAMEngine: {name!r} is a {type(param).__name__}, not a tensor")
        entries.append((name, param, options))

    for item in params:
        if isinstance(item, dict):
            options = {k: v for k, v in item.items() if k != "params"}
            group = item["params"]
            for sub in [group] if isinstance(group, Tensor) else group:
                add(sub, options)
        else:
            add(item, {})
    seen: set[int] = set()
    for name, param, _ in entries:
        if id(param) in seen:
            raise ValueError(f"SAMEngine: parameter {name!r} is given twice")
        seen.add(id(param))
    return entries


NORM_LAYERS: tuple[type[torch.nn.Module], ...] = (
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.LocalResponseNorm,
    *((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ()),
)


def unwrap(module: torch.nn.Module | None) -> torch.nn.Module | None:
    """The user's module inside DDP / Fabric / torch.compile wrappers, so parameter names do not depend on them."""
    while module is not None:
        inner = getattr(module, "_original_module", None) or getattr(module, "_orig_mod", None)
        if inner is None and isinstance(module, torch.nn.parallel.DistributedDataParallel):
            inner = module.module
        if inner is None or inner is module:
            return module
        module = inner
    return module


def selection(select: str | Callable[[str, Tensor], bool] | None, module: torch.nn.Module | None) -> set[int] | None:
    """The ids of the parameters ``select`` picks (None: all)."""
    if select is None:
        return None
    if module is None:
        raise ValueError("a params filter needs the module (its parameter names and layers)")
    if select == "norm":
        return {id(p) for m in module.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    check_filter(select)
    return {id(p) for n, p in module.named_parameters() if select(n, p)}  # type: ignore[operator]
