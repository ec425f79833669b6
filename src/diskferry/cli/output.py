"""The summary of a copy: one human line, or one JSON line, or nothing.

Chosen by option, never by where standard output goes: ``--json`` prints
one JSON object on one line whatever the terminal (scripts and the
benchmark harness read it), ``--quiet`` prints nothing (errors still go
to standard error), and the default is the human line. Times include
the verification when ``--verify`` ran; the copy's own time and rate are
given apart, since they measure the transfer alone.
"""

import argparse
import json
import sys
from typing import TextIO

from diskferry.cli import units
from diskferry.client import TransferResult

HUMAN, JSON, QUIET = "human", "json", "quiet"


def summary_fields(result: TransferResult, verify_seconds: float | None,
                   verified: bool) -> dict[str, object]:
    """The JSON summary of a ``TransferResult`` and its verification."""
    total = result.seconds + (verify_seconds or 0.0)
    return {
        "op": result.direction,
        "bytes": result.data_bytes,
        "image_bytes": result.image_size,
        "zero_bytes": result.zero_bytes,
        "skipped_bytes": result.skipped_bytes,
        "seconds": round(total, 6),
        "copy_seconds": round(result.seconds, 6),
        "verify_seconds": (round(verify_seconds, 6)
                           if verify_seconds is not None else None),
        "gib_s": round(result.gib_per_second, 3),
        "transport": result.transport,
        "transport_reason": result.transport_reason,
        "connections": result.connections,
        "verified": verified,
    }


def human_line(result: TransferResult, verify_seconds: float | None,
               verified: bool) -> str:
    """``downloaded 4.00 GiB (1.02 GiB data) in 17.31 s (copy 1.31 s at
    3.05 GiB/s, verify 16.00 s) via unix (4 connections), checksum
    verified``; an upload of a source shorter than the image says
    ``uploaded 10.00 MiB of 100.00 MiB``."""
    total = result.seconds + (verify_seconds or 0.0)
    copy_rate = units.rate(result.gib_per_second * units.GiB)
    if verify_seconds is None:
        timing = f"in {result.seconds:.2f} s, {copy_rate}"
    else:
        timing = (f"in {total:.2f} s (copy {result.seconds:.2f} s at "
                  f"{copy_rate}, verify {verify_seconds:.2f} s)")
    plural = "s" if result.connections > 1 else ""
    moved = units.human(result.copied_bytes)
    if result.copied_bytes != result.image_size:
        moved += f" of {units.human(result.image_size)}"
    line = (f"{result.direction}ed {moved} "
            f"({units.human(result.data_bytes)} data) {timing} via "
            f"{result.transport} ({result.connections} connection{plural})")
    if result.transport != "unix":
        line += f"; {result.transport_reason}"
    if verified:
        line += ", checksum verified"
    return line


def print_summary(mode: str, result: TransferResult, verify_seconds: float | None,
                  verified: bool, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    if mode == QUIET:
        return
    if mode == JSON:
        print(json.dumps(summary_fields(result, verify_seconds, verified)),
              file=stream)
    else:
        print(human_line(result, verify_seconds, verified), file=stream)


def add_output_options(parser: argparse.ArgumentParser, what: str = "summary") -> None:
    """``--quiet`` and ``--json``, which exclude each other."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--quiet", "-q", dest="output", action="store_const", const=QUIET,
        default=HUMAN, help="print nothing but errors")
    group.add_argument(
        "--json", dest="output", action="store_const", const=JSON,
        help=f"print the {what} as one JSON object on one line")
