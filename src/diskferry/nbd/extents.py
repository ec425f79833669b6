"""Turning block status replies into the project's extents, without I/O.

A block status reply holds one descriptor list per metadata context, each
starting at the request offset and possibly of a different total length
(a server may answer less than asked, and the last descriptor may run
past the request). ``walk`` cuts the lists into runs where every context
keeps one status, up to the first offset some context does not cover, so
the caller knows where to ask again. Runs are mapped to ``Extent`` and
adjacent extents with equal flags are merged, whatever alignment the
server used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from diskferry.extent import Extent, append_merged

from .wire import STATE_DIRTY, STATE_ZERO

Descriptors = Sequence[tuple[int, int]]


def walk(
    offset: int, lists: Sequence[Descriptors], limit: int
) -> Iterator[tuple[int, int, tuple[int, ...]]]:
    """Yield (start, length, status per list) from ``offset`` until the end
    of the shortest list or ``limit``, whichever comes first."""
    if not lists:
        return
    index = [0] * len(lists)
    ends = []
    for descs in lists:
        if not descs:
            return
        ends.append(offset + descs[0][0])
    pos = offset
    while pos < limit:
        boundary = min(min(ends), limit)
        yield (
            pos,
            boundary - pos,
            tuple(descs[i][1] for descs, i in zip(lists, index, strict=True)),
        )
        pos = boundary
        for n, descs in enumerate(lists):
            if ends[n] == boundary:
                index[n] += 1
                if index[n] == len(descs):
                    return
                ends[n] += descs[index[n]][0]


def zero_extents(
    offset: int,
    limit: int,
    allocation: Descriptors,
    depth: Descriptors | None,
    extents: list[Extent],
) -> int:
    """Append zero-context extents; return the first offset not covered.

    ``zero`` comes from base:allocation STATE_ZERO. ``hole`` comes only
    from qemu:allocation-depth 0: base:allocation STATE_HOLE also marks
    clusters of one qcow2 layer that are unallocated there but may be
    allocated in a backing file, so trusting it loses data.
    """
    lists: list[Descriptors] = [allocation] if depth is None else [allocation, depth]
    end = offset
    for start, length, status in walk(offset, lists, limit):
        zero = bool(status[0] & STATE_ZERO)
        hole = depth is not None and status[1] == 0
        append_merged(extents, Extent(start, length, zero, hole))
        end = start + length
    return end


def dirty_extents(
    offset: int,
    limit: int,
    bitmap: Descriptors,
    allocation: Descriptors | None,
    extents: list[Extent],
) -> int:
    """Append dirty-context extents; return the first offset not covered."""
    lists: list[Descriptors] = [bitmap] if allocation is None else [bitmap, allocation]
    end = offset
    for start, length, status in walk(offset, lists, limit):
        dirty = bool(status[0] & STATE_DIRTY)
        zero = allocation is not None and bool(status[1] & STATE_ZERO)
        append_merged(extents, Extent(start, length, zero, False, dirty))
        end = start + length
    return end
