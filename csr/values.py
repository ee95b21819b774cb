"""Typed values written as text, shared by the flags (csr/cli.py) and the FIELD=VALUE variants (csr/recipes.py)."""
from __future__ import annotations

TRUE = ("1", "true", "t", "yes", "y", "on")
FALSE = ("0", "false", "f", "no", "n", "off")


def parse_bool(s: str | bool) -> bool:
    """`True/False/1/0/yes/no/on/off` (any case); ValueError otherwise."""
    if isinstance(s, bool):
        return s
    v = s.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise ValueError(f"expected a boolean (True/False), got {s!r}")


def parse_fraction(s: str) -> float:
    """A float that may be written as a fraction, e.g. `1/32`; ValueError otherwise."""
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return float(num) / float(den)
        return float(s)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number or a fraction like 1/32, got {s!r}") from None
