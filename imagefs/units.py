"""Byte sizes as people write and read them: ``500M``, ``2G``, ``1.5GiB``; ``3.0 MiB``.

One convention for every verb: a bare ``K``/``M``/``G``/``T`` is binary (1024-based, as ``du`` and
``docker`` read it), ``KiB``… says so explicitly, and only ``KB``/``MB``/``GB``/``TB`` are decimal.
"""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``"1.5GiB"`` → 1610612736; raises ``ValueError`` naming the accepted forms."""
    m = _SIZE_RE.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"invalid size {text!r}: expected bytes or a number with K, M, G, T (KiB…; KB… are decimal)")
    return int(float(m.group(1)) * _UNITS[unit])


def human(n: int) -> str:
    """``3145728`` → ``3.0 MiB``; exact bytes below 1 KiB."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")
