"""Extents: which parts of an image hold data, and the work they make.

Pure functions over ``(start, length)`` ranges, kept apart from I/O so
they can be tested with tables: parsing the server's extents, mapping a
local file with ``SEEK_DATA``/``SEEK_HOLE``, and cutting data into
requests.
"""

from __future__ import annotations

import bisect
import functools
import sys
from collections.abc import Iterable
from typing import Any

from diskferry import extent
from diskferry.client.errors import ProtocolError
from diskferry.extent import Extent

#: A byte range as ``(start, end)``.
Range = tuple[int, int]


def parse_extents(items: Iterable[Any], size: int | None = None,
                  start: int = 0) -> list[Extent]:
    """Check the server's extents JSON and return a list of ``Extent``.

    They must be contiguous from ``start`` and, when ``size`` is known,
    end there.
    """
    extents: list[Extent] = []
    pos = start
    try:
        for item in items:
            ext = Extent(int(item["start"]), int(item["length"]),
                         bool(item.get("zero", False)),
                         bool(item.get("hole", False)),
                         bool(item.get("dirty", False)))
            if ext.start != pos or ext.length < 0:
                raise ProtocolError(
                    f"extents not contiguous at offset {pos}: {item}")
            extents.append(ext)
            pos = ext.end
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"malformed extent: {e}") from None
    if size is not None and pos != size:
        raise ProtocolError(f"extents end at {pos}, image size is {size}")
    return extents


def file_extents(fd: int, size: int) -> list[Extent]:
    """Map a whole local file (see ``diskferry.extent.file_extents``)."""
    return extent.file_extents(fd, 0, size)


def ranges(extents: Iterable[Extent], zero: bool) -> list[Range]:
    """Return the ``(start, end)`` ranges of extents whose zero flag is
    ``zero``, adjacent ones merged."""
    out: list[Range] = []
    for ext in extents:
        if ext.zero != zero or not ext.length:
            continue
        if out and out[-1][1] == ext.start:
            out[-1] = (out[-1][0], ext.end)
        else:
            out.append((ext.start, ext.end))
    return out


def subtract(wanted: Iterable[Range], known: list[Range]) -> list[Range]:
    """Return the parts of ranges ``wanted`` not covered by ``known``.

    Both are sorted, non-overlapping ``(start, end)`` lists; used to skip
    zeroing what the destination already reads as zeros.
    """
    out: list[Range] = []
    i = 0
    for start, end in wanted:
        while i < len(known) and known[i][1] <= start:
            i += 1
        j = i
        pos = start
        while j < len(known) and known[j][0] < end:
            k_start, k_end = known[j]
            if k_start > pos:
                out.append((pos, k_start))
            pos = max(pos, k_end)
            j += 1
        if pos < end:
            out.append((pos, end))
    return out


def covered(known: list[Range], start: int, end: int) -> bool:
    """Whether sorted, merged ranges ``known`` cover ``[start, end)``."""
    i = bisect.bisect_right(known, (start, sys.maxsize)) - 1
    return i >= 0 and known[i][0] <= start and known[i][1] >= end


def zero_runs(buf: bytearray, length: int, block: int, min_run: int,
              start: int = 0) -> list[tuple[int, int, bool]]:
    """Cut ``buf[start:start+length]`` into ``(start, end, zero)`` runs,
    offsets relative to ``start`` (see ``zero_runs_of``)."""
    with memoryview(buf) as view:
        return zero_runs_of([view[start:start + length]], block, min_run)


def zero_runs_of(views: list[memoryview], block: int,
                 min_run: int) -> list[tuple[int, int, bool]]:
    """Cut the consecutive buffers ``views`` (one range, in order) into
    ``(start, end, zero)`` runs, offsets from the first one's start.

    Zeros are found ``block`` bytes at a time (a C-speed compare, no
    copy; any buffer, a mapped file's too) and a run of them counts as
    zero only when it is at least ``min_run`` long or fills the whole
    range: shorter ones stay in the data around them, where they cost
    less than a request of their own.
    """
    zeros = _zeros(block)
    runs: list[list[Any]] = []
    pos = 0
    for view in views:
        size = len(view)
        at = 0
        while at < size:
            n = min(block, size - at)
            zero = zeros.startswith(view[at:at + n])
            if runs and runs[-1][2] == zero:
                runs[-1][1] = pos + n
            else:
                runs.append([pos, pos + n, zero])
            at += n
            pos += n
    out: list[tuple[int, int, bool]] = []
    for first, end, zero in runs:
        if zero and end - first < min_run and end - first < pos:
            zero = False
        if out and out[-1][2] == zero:
            out[-1] = (out[-1][0], end, zero)
        else:
            out.append((first, end, zero))
    return out


@functools.lru_cache(maxsize=4)
def _zeros(size: int) -> bytes:
    return bytes(size)
