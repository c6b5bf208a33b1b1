"""The allowed range of a numeric setting, in interval notation: ``"[1, inf)"``, ``"(0, 1]"``.

One string per setting serves the check (``check``), the error message (``describe``) and the
generated docs/CONFIG.md (which shows the string itself). NaN and infinities lie outside every
range: an open end at ``inf`` excludes infinity, and NaN fails every comparison.
"""

from __future__ import annotations

import math
import re

_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^\s\])]+)\s*([\])])$")


def parse(interval: str) -> tuple[float, bool, float, bool]:
    """``"[0, 1)"`` -> (0.0, True, 1.0, False): low, low included, high, high included."""
    match = _INTERVAL.match(interval)
    if not match:
        raise ValueError(f"bad interval {interval!r}; write e.g. '[1, inf)' or '(0, 1]'")
    low, high = float(match[2]), float(match[3])
    return low, match[1] == "[", high, match[4] == "]"


def contains(interval: str, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    low, low_in, high, high_in = parse(interval)
    return (value >= low if low_in else value > low) and (value <= high if high_in else value < high)


def describe(interval: str) -> str:
    """``"[1, inf)"`` -> ``">= 1"``, ``"(0, inf)"`` -> ``"> 0"``, ``"[0, 1)"`` -> ``"in [0, 1)"``."""
    low, low_in, high, high_in = parse(interval)
    if high == float("inf") and not high_in:
        return f"{'>=' if low_in else '>'} {_number(low)}"
    return f"in {interval}"


def check(key: str, value, interval: str) -> None:
    """A ``ValueError`` naming ``key`` when ``value`` lies outside ``interval``."""
    if not contains(interval, value):
        finite = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
        raise ValueError(f"{key} must be {'' if finite else 'a finite number '}{describe(interval)}, got {value!r}")


def _number(x: float) -> str:
    return str(int(x)) if x.is_integer() else repr(x)
