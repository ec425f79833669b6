"""Argument types that check a value at the door.

argparse turns the ``ArgumentTypeError`` raised here into a usage error
naming the option (``argument --size: ...``), exit status 2, no
traceback: a bad value never reaches the code that would fail on it.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

#: Binary multiples, as qemu-img and truncate(1) read K, M, G, T.
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}

_SIZE = re.compile(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)


def size(text: str) -> int:
    """Bytes from ``4096``, ``512K``, ``1G``, ``1GiB``, ``2t`` (binary)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: a number of bytes, optionally with "
            f"K, M, G or T (binary multiples), e.g. 1G")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def integer(minimum: int | None = None,
            maximum: int | None = None) -> Callable[[str], int]:
    """An int type with an inclusive range, named in its error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid integer {text!r}") from None
        if minimum is not None and value < minimum or \
                maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(
                f"{value} is out of range: {_range(minimum, maximum)}")
        return value

    return parse


def word_list(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A comma separated list of words, each one of ``allowed``."""

    def parse(text: str) -> list[str]:
        words = [word.strip() for word in text.split(",") if word.strip()]
        wrong = [word for word in words if word not in allowed]
        if wrong or not words:
            raise argparse.ArgumentTypeError(
                f"invalid {text!r}: comma separated, each of "
                f"{', '.join(allowed)}")
        return words

    return parse


def _range(minimum: int | None, maximum: int | None) -> str:
    if maximum is None:
        return f"at least {minimum}"
    if minimum is None:
        return f"at most {maximum}"
    return f"between {minimum} and {maximum}"
