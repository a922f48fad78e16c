"""Option checks shared by the variants, the engine and the adapters: one place for numbers and flags.

Each returns the value (as a float, an int or a bool) or raises ``ValueError`` with ``"<owner>: <name> must be ...,
got <value>"`` and an optional hint, so errors read alike wherever an option is given.
"""

from __future__ import annotations

import math
from typing import Any

_RANGES = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "any": lambda v: True,
}


def _prefix(owner: str) -> str:
    return f"{owner}: " if owner else ""


def real(owner: str, name: str, value: Any, where: str = "> 0", hint: str = "") -> float:
    """A finite real number (not a bool) in the range ``where`` (``"> 0"``, ``">= 0"``, ``"in [0, 1)"``,
    ``"in [0, 1]"`` or ``"any"``)."""
    is_number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not is_number or not _RANGES[where](value):
        wanted = "a finite number" if where == "any" else f"a finite number {where}"
        raise ValueError(f"{_prefix(owner)}{name} must be {wanted}, got {value!r}{hint}")
    return float(value)


def integer(owner: str, name: str, value: Any, minimum: int, hint: str = "") -> int:
    """An int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{_prefix(owner)}{name} must be an int >= {minimum}, got {value!r}{hint}")
    return value


def flag(owner: str, name: str, value: Any) -> bool:
    """A real bool: ``"yes"``, ``1`` or ``None`` are not accepted."""
    if not isinstance(value, bool):
        raise ValueError(f"{_prefix(owner)}{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (exact spelling)."""
    if value not in choices:
        raise ValueError(f"{_prefix(owner)}unknown {name} {value!r}; choose one of {choices}")
    return value
