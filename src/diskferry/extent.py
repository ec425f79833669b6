"""The extent record shared by backends, handlers, the NBD client and the client."""

import errno
import os
from collections.abc import Iterable, Iterator
from typing import NamedTuple


class Extent(NamedTuple):
    """A run of an image with the same allocation state.

    ``zero``: the range reads as zeros. ``hole``: no layer of the image
    allocates the range: not the file (a raw file's hole), nor any image
    of a backing chain (``qemu:allocation-depth`` 0). A hole always reads
    as zeros; a zero range that is not a hole is allocated zeros, or zeros
    some layer provides, and a copy of one layer alone must write it.
    ``dirty`` is only meaningful in the dirty context.

    A named tuple, not a dataclass: cheap to make by the thousand, and
    cheap to import for a command-line client.
    """

    start: int
    length: int
    zero: bool
    hole: bool = False
    dirty: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length


def append_merged(extents: list[Extent], extent: Extent) -> None:
    """Append, merging with the last extent when adjacent with equal flags."""
    if extents:
        last = extents[-1]
        if (last.end == extent.start and
                (last.zero, last.hole, last.dirty) ==
                (extent.zero, extent.hole, extent.dirty)):
            extents[-1] = last._replace(length=last.length + extent.length)
            return
    extents.append(extent)


def merged(extents: Iterable[Extent]) -> list[Extent]:
    """The extents with empty ones dropped and adjacent equal ones joined."""
    result: list[Extent] = []
    for extent in extents:
        if extent.length:
            append_merged(result, extent)
    return result


def file_extents(fd: int, start: int, end: int) -> list[Extent]:
    """Map ``[start, end)`` of a local file with ``SEEK_DATA``/``SEEK_HOLE``.

    Holes are zero holes; where the file system cannot tell (or ``fd``
    is a block device), everything is data. One syscall per extent.
    """
    extents: list[Extent] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                data = end
            elif e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                extents.append(Extent(pos, end - pos, zero=False))
                break
            else:
                raise
        data = min(data, end)
        if data > pos:
            extents.append(Extent(pos, data - pos, zero=True, hole=True))
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        extents.append(Extent(data, hole - data, zero=False))
        pos = hole
    return extents


def split(start: int, end: int, step: int) -> Iterator[tuple[int, int]]:
    """Cut ``[start, end)`` into ``(offset, length)`` pieces of ``step``
    (the last one shorter), as requests of at most ``step`` bytes."""
    for pos in range(start, end, step):
        yield pos, min(step, end - pos)
