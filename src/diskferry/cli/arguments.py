"""Option values checked at the door.

Each function is an argparse ``type=``: it returns the value or raises
``argparse.ArgumentTypeError``, so that argparse prints ``argument
--NAME: ...`` and exits with status 2 before anything is sent. A bad
value never reaches a socket (``--read-timeout 0`` used to surface as
``SSLWantReadError``, ``--request-size 1`` as a ten-minute copy).
"""

import argparse
import os
from collections.abc import Callable
from typing import TypeVar

from diskferry.cli import units

_N = TypeVar("_N", int, float)


def size(low: int, high: int) -> Callable[[str], int]:
    """A size with an optional K/M/G/T suffix, within [low, high]."""
    def parse(text: str) -> int:
        try:
            value = units.parse_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{text!r} is out of range: between {units.human(low)} and "
                f"{units.human(high)}")
        return value
    return parse


def any_size(text: str) -> int:
    """A size of at least one byte, with an optional K/M/G/T suffix."""
    return size(1, 2**63 - 1)(text)


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer, at least ``low`` and at most ``high`` (when given)."""
    def parse(text: str) -> int:
        value = _number(text, int, "an integer")
        if value < low or (high is not None and value > high):
            bounds = (f"at least {low}" if high is None
                      else f"between {low} and {high}")
            raise argparse.ArgumentTypeError(f"{value} is out of range: "
                                             f"{bounds}")
        return value
    return parse


def seconds(text: str) -> float:
    """A timeout: a number of seconds greater than 0."""
    value = _number(text, float, "a number of seconds")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is out of range: more than 0 seconds")
    return value


def _number(text: str, convert: Callable[[str], _N], what: str) -> _N:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def readable_file(text: str) -> str:
    """A file that exists and can be read: named when it cannot."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a directory")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: permission denied")
    return text
