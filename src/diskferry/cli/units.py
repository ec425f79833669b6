"""Sizes as people type and read them, in binary units.

One place for both directions, so that what the progress bar shows, what
the summary says and what an option accepts use the same units: ``4K``
is 4096 bytes, and 4096 bytes is shown as ``4.00 KiB``.
"""

import re

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

_SUFFIXES = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}
_SIZE = re.compile(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", re.I)
_LONGEST_SIZE = 40


def parse_size(text: str) -> int:
    """Bytes in "8M", "8MiB", "4k", "1T" or "1048576"; ValueError if not
    a size."""
    match = _SIZE.fullmatch(text) if len(text) <= _LONGEST_SIZE else None
    if not match:
        raise ValueError(f"invalid size {text!r} (a number of bytes, with "
                         f"an optional suffix K, M, G or T)")
    return int(match[1]) * _SUFFIXES[match[2].lower()]


def human(n: float) -> str:
    """``n`` bytes as "512 B", "4.00 KiB", ... "3.00 TiB"."""
    if n < KiB:
        return f"{n:.0f} B"
    for unit, scale in (("KiB", KiB), ("MiB", MiB), ("GiB", GiB)):
        if n < 1024 * scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / TiB:.2f} TiB"


def rate(bytes_per_second: float) -> str:
    """A throughput, as the summary prints it: "38.06 GiB/s"."""
    return human(bytes_per_second) + "/s"
