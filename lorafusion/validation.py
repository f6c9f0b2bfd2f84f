"""Small checks shared by every config and data validator."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["is_number", "check_positive_int", "check_positive_number", "check_seed", "check_probability"]


def is_number(value: Any) -> bool:
    """A finite int or float; bools and NaN/inf are not numbers a user meant."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_positive_int(where: str, value: Any, example: str) -> None:
    """ValueError naming `where` (e.g. 'adapter.rank') unless value is an int ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}={value!r} must be a positive integer, e.g. {where.rsplit('.', 1)[-1]}: {example}")


def check_positive_number(where: str, value: Any, example: str) -> None:
    if not is_number(value) or value <= 0:
        raise ValueError(f"{where}={value!r} must be a positive number, e.g. {where.rsplit('.', 1)[-1]}: {example}")


def check_seed(where: str, value: Any, optional: bool = False) -> None:
    """ValueError unless value is an int ≥ 0 (or None when optional)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}={value!r} must be an integer ≥ 0" + (" or null" if optional else ""))


def check_probability(where: str, value: Any) -> None:
    """ValueError unless value is in [0, 1) (a dropout probability)."""
    if not is_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{where}={value!r} must be in [0, 1), e.g. {where.rsplit('.', 1)[-1]}: 0.05")
