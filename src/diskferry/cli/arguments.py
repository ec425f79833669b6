"""Option values checked at the door.

Each function is an argparse ``type=``: it returns the value or raises
``argparse.ArgumentTypeError``, so that argparse prints ``argument
--NAME: ...`` and exits with status 2 before anything is sent. A bad
value never reaches a socket (``--read-timeout 0`` used to surface as
``SSLWantReadError``, ``--request-size 1`` as a ten-minute copy).
"""

import argparse
import os
import re
import ssl
from collections.abc import Callable
from typing import TypeAlias, TypeVar

from diskferry.cli import units

_N = TypeVar("_N", int, float)

#: What ``diskferry COMMAND`` modules register their parsers on.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

#: Largest size a ticket or an option takes: what a signed 64-bit offset
#: holds, as the daemon checks.
MAX_SIZE = 2**63 - 1

#: A ticket id travels as one segment of ``/images/ID`` and
#: ``/tickets/ID``, given to clients as written: RFC 3986's unreserved
#: characters are the ones every client sends unquoted and no server
#: splits, decodes or normalizes ("." and ".." are path steps).
TICKET_ID_RULE = ("letters, digits, '-', '_', '.' and '~' only (what a "
                  "URL path carries as written), not '.' or '..'")
_TICKET_ID = re.compile(r"[A-Za-z0-9._~-]+")


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
    return size(1, MAX_SIZE)(text)


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


def ca_file(text: str) -> str:
    """A readable file of PEM CA certificates, named when it is not one
    (OpenSSL's own message names no file)."""
    readable_file(text)
    try:
        ssl.create_default_context(cafile=text)
    except ssl.SSLError as e:
        raise argparse.ArgumentTypeError(
            f"{text}: not a PEM file of CA certificates "
            f"({e.reason or e})") from None
    return text


def word_list(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A comma separated list of words, each one of ``allowed``."""
    def parse(text: str) -> list[str]:
        words = [word.strip() for word in text.split(",") if word.strip()]
        if words and all(word in allowed for word in words):
            return words
        raise argparse.ArgumentTypeError(
            f"invalid {text!r}: comma separated, each of "
            f"{', '.join(allowed)}")
    return parse


def ticket_id(text: str) -> str:
    """A ticket id that a transfer URL carries as it is written."""
    if not _TICKET_ID.fullmatch(text) or text in (".", ".."):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a ticket id: {TICKET_ID_RULE}")
    return text
