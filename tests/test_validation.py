"""The shared option checks (lightning_sam.validation)."""

from __future__ import annotations

import math

import pytest

from lightning_sam import validation as check


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, True, "1", None])
def test_real_rejects_what_is_not_a_finite_positive_number(value):
    with pytest.raises(ValueError, match=r"^owner: x must be a finite number > 0, got .* \(hint\)$"):
        check.real("owner", "x", value, "> 0", " (hint)")


def test_real_ranges_and_conversion():
    assert check.real("", "x", 0, ">= 0") == 0.0 and isinstance(check.real("", "x", 1, "> 0"), float)
    assert check.real("", "x", -3.5, "any") == -3.5
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        check.real("", "x", 1.0, "in [0, 1)")
    assert check.real("", "x", 1.0, "in [0, 1]") == 1.0


@pytest.mark.parametrize("value", [0, 2.0, True, "3"])
def test_integer(value):
    with pytest.raises(ValueError, match="must be an int >= 1"):
        check.integer("o", "n", value, 1)
    assert check.integer("o", "n", 3, 1) == 3


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_flag_and_choice(value):
    with pytest.raises(ValueError, match="must be True or False"):
        check.flag("o", "f", value)
    assert check.flag("o", "f", False) is False
    with pytest.raises(ValueError, match=r"unknown mode 'c'; choose one of \('a', 'b'\)"):
        check.choice("o", "mode", "c", ("a", "b"))
