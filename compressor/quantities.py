"""Human-friendly numbers on the command line: 59.5M, 1.8G, 250k."""
from __future__ import annotations

import math
import re

from compressor.errors import BadInput

_SUFFIXES = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_PATTERN = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtT]?)\s*$")


def parse_quantity(text: str | float | int, *, what: str = "value") -> float:
    """Parse `59.5M` -> 59_500_000.0. Raises BadInput on anything else."""
    if isinstance(text, bool):
        raise BadInput(f"{what}: expected a number, got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = _PATTERN.match(str(text))
        if not match:
            raise BadInput(f"{what}: cannot read {text!r} as a number (examples: 5, 2.5, 59.5M, 1.8G)")
        value = float(match.group(1)) * _SUFFIXES[match.group(2).upper()]
    if not math.isfinite(value):
        raise BadInput(f"{what}: {text!r} is not a finite number")
    return value
