"""Byte sizes: parse ``180MiB``/``6GiB``/``6GB``/``6e9`` and format bytes for people.

Decimal units (kB, MB, GB, TB) are powers of 1000, binary units (KiB, MiB, GiB, TiB) powers of 1024, as in
IEC 80000-13. GPU vendors print "12 GB" on a box that holds 12 GiB; that ambiguity is why a unit is always
spelled out in lsaq's output and why ``GB`` here means exactly 10^9 bytes.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
ACCEPTED_UNITS = "B, kB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024), or a plain number of bytes"
# No memory lsaq plans for comes near an exabyte; a larger value is a typo (1e400GiB), and past 2^63 it would
# overflow the integer and float arithmetic of the memory model.
MAX_BYTES = 10**18
ACCEPTED_RANGE = "0 to 1 EB (10^18 bytes)"

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: str | int | float, *, what: str = "size") -> int:
    """Bytes in ``value``: ``"180MiB"``, ``"6GiB"``, ``"6 GB"``, ``"6e9"``, ``6000000000``.

    Fractional byte counts round down, so a parsed budget never promises more than was written.
    Raises ``ValueError`` (naming ``what`` and the accepted units or range) for anything else: negatives, values
    that are not finite, and sizes over :data:`MAX_BYTES`.
    """
    if isinstance(value, bool):
        raise ValueError(f"{what}: {value!r} is not a size; accepted units: {ACCEPTED_UNITS}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what}: {value} is negative")
        return int(_bounded(value, value, what))
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{what}: {value!r} is not a finite, non-negative size")
        return int(math.floor(_bounded(value, value, what)))
    if str(value).strip().startswith("-"):
        raise ValueError(f"{what}: {value!r} is negative")
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{what}: cannot read {value!r} as a size; accepted units: {ACCEPTED_UNITS}")
    unit = (m.group(2) or "b").lower()
    if unit not in _UNITS:
        raise ValueError(f"{what}: unknown unit {m.group(2)!r} in {value!r}; accepted units: {ACCEPTED_UNITS}")
    try:
        # Decimal keeps "1.1GB" exact (binary floats would make it 1100000000.0000002 or worse).
        exact = Decimal(m.group(1)) * _UNITS[unit]
    except InvalidOperation:  # pragma: no cover - the regex only lets numbers through
        raise ValueError(f"{what}: cannot read {value!r} as a size; accepted units: {ACCEPTED_UNITS}") from None
    # bounded as a Decimal: int() of 1e400 would build a 1330-bit integer first
    return int(_bounded(exact, value, what))  # int() truncates toward zero: a fractional byte rounds down


def _bounded(n: "int | float | Decimal", value: object, what: str) -> "int | float | Decimal":
    """``n`` (the number ``value`` reads as), or ``ValueError`` when it is over :data:`MAX_BYTES`."""
    if n > MAX_BYTES:
        raise ValueError(f"{what}: {value!r} is over an exabyte; accepted: {ACCEPTED_RANGE}")
    return n


def format_bytes(n: int | float, unit: str | None = None, digits: int = 2) -> str:
    """``n`` bytes in binary units (``"12.55 GiB"``); ``unit`` forces one (e.g. ``"GB"``)."""
    if unit is not None:
        key = unit.lower()
        if key not in _UNITS:
            raise ValueError(f"unknown unit {unit!r}; accepted units: {ACCEPTED_UNITS}")
        return f"{n / _UNITS[key]:.{digits}f} {unit}"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for name in ("TiB", "GiB", "MiB", "KiB"):
        if n >= _UNITS[name.lower()]:
            return f"{sign}{n / _UNITS[name.lower()]:.{digits}f} {name}"
    return f"{sign}{int(n)} B"
