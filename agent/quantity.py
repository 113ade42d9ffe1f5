"""Kubernetes-style quantities: 512Mi, 1G, 1.5Gi, 1000000 (bytes), 500m is refused for bytes."""
from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}
_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_quantity(value: str | int | float) -> int:
    """Bytes from a quantity. Raises ValueError naming the value when it does not parse."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"negative quantity: {value!r}")
        return int(value)
    m = _RE.match(str(value))
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"not a quantity: {value!r} (expected e.g. 512Mi, 1G, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])
