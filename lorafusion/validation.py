"""Small checks shared by every config and data validator."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["is_number"]


def is_number(value: Any) -> bool:
    """A finite int or float; bools and NaN/inf are not numbers a user meant."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
