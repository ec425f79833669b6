"""A new qcow2 image with no backing file, written by the client itself.

A download into a fresh qcow2 knows every range it will write before the
first byte arrives (the transfer's extents), so it can lay the image out
itself: each byte is received once and written once at its place, with
no qemu-nbd between (two copies in all, where writing through qemu-nbd
takes four and a process of its own; without zero detection the kernel
splices the body into the file, one copy).

Layout (qcow2 version 3, 64 KiB clusters, 16-bit refcounts)::

    cluster 0       header
    clusters 1..N   data: the k-th cluster the extents touch, in guest
                    order, at cluster 1 + k
    then            L2 tables, the L1 table, refcount blocks, refcount
                    table: written once, at the end, when what was
                    written is known

A data cluster that held only zeros is not written: its place stays a
hole in the file, free (refcount 0), and the guest reads zeros there
(unallocated, and no backing file). The file is complete only once
``finish`` has written its tables; until then it is no image at all.
"""

from __future__ import annotations

import bisect
import functools
import math
import os
import struct
from collections.abc import Iterator

from diskferry.client.connection import ImageConnection
from diskferry.client.extents import Range
from diskferry.client.partfile import PartFile
from diskferry.client.piece import Cursor
from diskferry.fileio import pwrite_all

CLUSTER_BITS = 16
CLUSTER_SIZE = 1 << CLUSTER_BITS
#: 16-bit refcounts: a refcount block counts this many clusters.
REFCOUNT_ORDER = 4
REFCOUNTS_PER_BLOCK = CLUSTER_SIZE * 8 >> REFCOUNT_ORDER
#: 64-bit table entries: an L2 table maps this many clusters.
ENTRIES_PER_TABLE = CLUSTER_SIZE // 8
#: An entry whose cluster has refcount 1 (may be written in place).
COPIED = 1 << 63

SECTOR_SIZE = 512

HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")
MAGIC = b"QFI\xfb"


class Layout:
    """Where each guest cluster a copy writes lies in the file.

    ``extents`` are the ``(start, end)`` ranges that will be written,
    sorted; clusters they share are placed once.
    """

    def __init__(self, size: int, extents: list[tuple[int, int]]) -> None:
        self.size = size
        #: Runs of consecutive guest clusters: first cluster, count, and
        #: the index of the first among all placed clusters.
        self._firsts: list[int] = []
        self._counts: list[int] = []
        self._ranks: list[int] = []
        placed = 0
        for start, end in extents:
            if end <= start:
                continue
            first, last = start // CLUSTER_SIZE, (end - 1) // CLUSTER_SIZE
            if self._firsts:
                prev_last = self._firsts[-1] + self._counts[-1] - 1
                first = max(first, prev_last + 1)
                if first > last:
                    continue
                if first == prev_last + 1:
                    self._counts[-1] += last - first + 1
                    placed += last - first + 1
                    continue
            self._firsts.append(first)
            self._counts.append(last - first + 1)
            self._ranks.append(placed)
            placed += last - first + 1
        #: How many data clusters the file has room for.
        self.clusters = placed

    def rank(self, cluster: int) -> int:
        """Index of guest ``cluster`` among the placed ones."""
        i = bisect.bisect_right(self._firsts, cluster) - 1
        if i < 0 or cluster >= self._firsts[i] + self._counts[i]:
            raise ValueError(f"guest cluster {cluster} has no place")
        return self._ranks[i] + cluster - self._firsts[i]

    def host_offset(self, offset: int) -> int:
        """Where guest byte ``offset`` lies in the file."""
        cluster, within = divmod(offset, CLUSTER_SIZE)
        return (1 + self.rank(cluster)) * CLUSTER_SIZE + within

    def placed(self) -> Iterator[tuple[int, int]]:
        """``(guest cluster, rank)`` of every placed cluster, in order."""
        for first, count, rank in zip(self._firsts, self._counts,
                                      self._ranks, strict=False):
            for i in range(count):
                yield first + i, rank + i


def tables(layout: Layout, written: bytearray) -> list[tuple[int, bytes]]:
    """The header and tables of the image, as ``(file offset, bytes)``:
    ``written[rank]`` says whether the placed cluster of that rank holds
    data (else it is left unallocated)."""
    l1_size = math.ceil(layout.size / (CLUSTER_SIZE * ENTRIES_PER_TABLE))
    l2 = _l2_tables(layout, written)
    l1_clusters = _clusters(l1_size * 8)
    next_cluster = 1 + layout.clusters
    l2_at = {index: (next_cluster + i) * CLUSTER_SIZE
             for i, index in enumerate(sorted(l2))}
    next_cluster += len(l2)
    l1_offset = next_cluster * CLUSTER_SIZE
    next_cluster += l1_clusters
    blocks, table_clusters = _refcount_clusters(next_cluster)
    blocks_offset = next_cluster * CLUSTER_SIZE
    table_offset = blocks_offset + blocks * CLUSTER_SIZE
    end_cluster = next_cluster + blocks + table_clusters

    refcounts = _refcounts(layout, written, blocks, end_cluster)
    l1 = bytearray(l1_clusters * CLUSTER_SIZE)
    for index, offset in l2_at.items():
        l1[index * 8:index * 8 + 8] = (offset | COPIED).to_bytes(8, "big")
    refcount_table = bytearray(table_clusters * CLUSTER_SIZE)
    for i in range(blocks):
        refcount_table[i * 8:i * 8 + 8] = (
            blocks_offset + i * CLUSTER_SIZE).to_bytes(8, "big")
    # qemu counts a disk in 512-byte sectors: a size between is rounded
    # up, as qemu-img create does (the tail reads zeros).
    virtual_size = -(-layout.size // SECTOR_SIZE) * SECTOR_SIZE
    header = HEADER.pack(
        MAGIC, 3, 0, 0, CLUSTER_BITS, virtual_size, 0, l1_size, l1_offset,
        table_offset, table_clusters, 0, 0, 0, 0, 0, REFCOUNT_ORDER,
        HEADER.size)
    # The end of header extensions: type 0, length 0.
    header += bytes(8)
    out = [(0, header)]
    out += [(l2_at[index], bytes(l2[index])) for index in sorted(l2)]
    out += [(l1_offset, bytes(l1)), (blocks_offset, bytes(refcounts)),
            (table_offset, bytes(refcount_table))]
    return out


def _l2_tables(layout: Layout, written: bytearray) -> dict[int, bytearray]:
    """The L2 tables that map a written cluster, by their L1 index."""
    l2: dict[int, bytearray] = {}
    for cluster, rank in layout.placed():
        if not written[rank]:
            continue
        table = l2.setdefault(cluster // ENTRIES_PER_TABLE,
                              bytearray(CLUSTER_SIZE))
        at = cluster % ENTRIES_PER_TABLE * 8
        table[at:at + 8] = ((1 + rank) * CLUSTER_SIZE | COPIED).to_bytes(8,
                                                                       "big")
    return l2


def _refcount_clusters(used_before: int) -> tuple[int, int]:
    """Refcount blocks and refcount table clusters for an image that uses
    ``used_before`` clusters before them: the blocks count every cluster
    in use, themselves included."""
    blocks = table_clusters = 0
    while True:
        total = used_before + blocks + table_clusters
        need = math.ceil(total / REFCOUNTS_PER_BLOCK)
        need_table = _clusters(need * 8)
        if (need, need_table) == (blocks, table_clusters):
            return blocks, table_clusters
        blocks, table_clusters = need, need_table


def _refcounts(layout: Layout, written: bytearray, blocks: int,
               end_cluster: int) -> bytearray:
    """The refcount blocks: 1 for the header, each written data cluster,
    and every cluster of the tables up to ``end_cluster``."""
    refcounts = bytearray(blocks * CLUSTER_SIZE)
    one = b"\x00\x01"
    refcounts[0:2] = one  # the header
    for rank in range(layout.clusters):
        if written[rank]:
            refcounts[(1 + rank) * 2:(2 + rank) * 2] = one
    refcounts[(1 + layout.clusters) * 2:end_cluster * 2] = one * (
        end_cluster - 1 - layout.clusters)
    return refcounts


def _clusters(nbytes: int) -> int:
    return math.ceil(nbytes / CLUSTER_SIZE)


def write_tables(fd: int, layout: Layout, written: bytearray) -> None:
    """Write the header and tables into image ``fd``."""
    for offset, data in tables(layout, written):
        pwrite_all(fd, memoryview(data), offset)


class Destination(PartFile):
    """A download into a new qcow2 at ``path`` (no backing file), made
    as ``PATH.part`` and renamed once its tables are written and synced.

    ``extents`` are the ranges the download will GET, sorted. With
    ``detect_zeros``, a cluster's worth of zeros received is not
    written (it stays unallocated).
    """

    #: Pieces may come in parallel, in any order; nothing to resume.
    sequential = False
    #: A new image without a backing file reads zeros everywhere.
    zeroed = True
    done: list[Range] = []

    def __init__(self, path: str, size: int, extents: list[tuple[int, int]],
                 *, detect_zeros: bool) -> None:
        super().__init__(path)
        self._layout = Layout(size, extents)
        self._written = bytearray(self._layout.clusters)
        self._detect_zeros = detect_zeros
        self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_TRUNC
                           | os.O_CLOEXEC, 0o644)

    def receive(self, con: ImageConnection, cursor: Cursor) -> None:
        """GET the piece from ``cursor.offset`` to its end and write it
        at its place."""
        if not self._detect_zeros:
            self._splice(con, cursor)
            return
        with con.get(cursor.offset, cursor.remaining) as body:
            for view, pos in body:
                self._write(view, pos)
        cursor.advance_to(cursor.end)

    def _splice(self, con: ImageConnection, cursor: Cursor) -> None:
        """GET the piece straight into its place in the file (the kernel
        moving the bytes)."""
        layout = self._layout
        offset, end = cursor.offset, cursor.end
        for cluster in range(offset // CLUSTER_SIZE,
                             (end - 1) // CLUSTER_SIZE + 1):
            self._written[layout.rank(cluster)] = 1
        con.read_to_fd(self._fd, offset, end - offset, cursor.advance,
                       fd_offset=layout.host_offset(offset))

    def _write(self, view: memoryview, offset: int) -> None:
        """Write guest data ``view`` at ``offset``, zero clusters left
        out: consecutive clusters lie consecutively in the file, so each
        run of them is one write."""
        layout = self._layout
        end = offset + len(view)
        runs: list[list[int]] = []
        pos = offset
        while pos < end:
            cluster = pos // CLUSTER_SIZE
            stop = min(end, (cluster + 1) * CLUSTER_SIZE)
            if not (self._detect_zeros and _zeros().startswith(
                    view[pos - offset:stop - offset])):
                self._written[layout.rank(cluster)] = 1
                if runs and runs[-1][1] == pos:
                    runs[-1][1] = stop
                else:
                    runs.append([pos, stop])
            pos = stop
        for start, stop in runs:
            pwrite_all(self._fd, view[start - offset:stop - offset],
                        layout.host_offset(start))

    def zero(self, offset: int, length: int) -> None:
        """Nothing to do: a fresh image reads zeros (never called, as
        ``zeroed`` says)."""

    def commit(self) -> None:
        """Write the tables, sync, and give the image its name."""
        write_tables(self._fd, self._layout, self._written)
        os.fsync(self._fd)
        os.close(self._fd)
        self._rename()

    def _abandon(self) -> None:
        os.close(self._fd)


@functools.lru_cache(maxsize=1)
def _zeros() -> bytes:
    return bytes(CLUSTER_SIZE)
