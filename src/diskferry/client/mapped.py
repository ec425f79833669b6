"""Images whose data lies plain in their files, sent from the files.

A qcow2 image, and a backing chain of qcow2 and raw layers, that is
neither compressed nor encrypted and keeps no external data file, holds
every allocated guest range as the guest reads it, at an offset of one
of its files: ``qemu-img map`` says which layer and where. An upload of
such an image is then sent the way a raw file is (``sendfile`` from the
layer's file, the kernel moving the bytes), with no qemu-nbd between:
one copy fewer on each side of a socket, and no process to start.

Anything else (a compressed cluster, another format, an archive
member, a map too large to hold) goes through qemu-nbd
(``imagecopy.NbdSource``), which ``plain_layout`` says by returning
None. Runs of zeros inside data are found by comparing the mapped file
in place (``mmap``, no copy) and sent as PATCH zero, as through qemu-nbd.
As for any upload, the image must not change while it is copied (a
layer truncated under the copy would fault the mapped compare).
"""

from __future__ import annotations

import bisect
import json
import logging
import mmap
import os
import stat
import subprocess
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from diskferry.client import extents as _extents
from diskferry.client import formats
from diskferry.client.connection import FilePart, ImageConnection
from diskferry.client.imagecopy import MIN_ZERO_REQUEST, ZERO_BLOCK
from diskferry.client.piece import Cursor, Piece
from diskferry.client.qemunbd import blockdev_filename
from diskferry.client.sender import Sender
from diskferry.extent import Extent

log = logging.getLogger("diskferry.client")

#: Formats whose map offsets point into the layer's own file.
PLAIN_FORMATS = ("qcow2", "raw")

#: Largest ``qemu-img map`` output held (about 300,000 ranges: a very
#: fragmented image); beyond it the image is read through qemu-nbd,
#: which needs no map in memory.
MAX_MAP_BYTES = 32 * 1024**2

#: Seconds ``qemu-img map`` may take.
MAP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Layout:
    """Where an image's guest ranges lie: ``extents`` (adjacent data
    merged, so that requests are as long as the engine asks), and the
    data's places, sorted: guest range ``[starts[i], ends[i])`` is at
    ``offsets[i]`` of ``files[layers[i]]``."""

    files: tuple[str, ...]
    extents: list[Extent]
    starts: list[int]
    ends: list[int]
    layers: list[int]
    offsets: list[int]

    def parts(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """``(layer, file offset, length)`` of guest data ``[start, end)``,
        in order."""
        out = []
        i = bisect.bisect_right(self.starts, start) - 1
        pos = start
        while pos < end:
            if i < 0 or i >= len(self.starts) or not (
                    self.starts[i] <= pos < self.ends[i]):
                raise ValueError(f"offset {pos} holds no mapped data")
            n = min(end, self.ends[i]) - pos
            out.append((self.layers[i],
                        self.offsets[i] + pos - self.starts[i], n))
            pos += n
            i += 1
        return out


def plain_layout(path: str, image: formats.Source) -> Layout | None:
    """The layout of ``image`` (opened from ``path``) when all its data
    lies plain in its layers' files; None when it must be read through
    qemu-nbd."""
    files = _layer_files(path, image)
    if files is None:
        return None
    entries = _map(image.spec)
    if entries is None:
        return None
    return _layout(files, entries)


def _layer_files(path: str, image: formats.Source) -> tuple[str, ...] | None:
    """Each layer's file, top first, when every layer is a local file in
    a format whose map offsets point into it."""
    if image.spec.get("file") != formats.file_node(path):
        return None  # an archive member: offsets relative to it
    files = []
    for depth, layer in enumerate(image.chain):
        specific = layer.get("format-specific") or {}
        if (layer.get("format") not in PLAIN_FORMATS
                or (specific.get("data") or {}).get("data-file")):
            return None
        name = os.path.abspath(path) if depth == 0 else layer.get("filename")
        if not isinstance(name, str) or not os.path.isabs(name):
            return None  # a protocol (nbd:, json:), not a file
        try:
            mode = os.stat(name).st_mode
        except OSError:
            return None
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            return None
        files.append(name)
    return tuple(files)


def _map(spec: dict[str, object]) -> list[dict[str, Any]] | None:
    """``qemu-img map`` of the image, or None when it fails or is too
    large to hold."""
    argv = ["qemu-img", "map", "--output=json", "-U", blockdev_filename(spec)]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
    except OSError as e:
        log.debug("qemu-img map: %s", e)
        return None
    assert proc.stdout is not None
    with proc:
        out = proc.stdout.read(MAX_MAP_BYTES + 1)
        if len(out) > MAX_MAP_BYTES:
            proc.kill()
            log.debug("map larger than %d bytes: read through qemu-nbd",
                      MAX_MAP_BYTES)
            return None
        try:
            status = proc.wait(MAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            return None
    if status != 0:
        return None
    try:
        entries = json.loads(out)
    except ValueError:
        return None
    return entries if isinstance(entries, list) else None


def _layout(files: tuple[str, ...],
            entries: list[dict[str, Any]]) -> Layout | None:
    """A ``Layout`` from map entries; None at the first one whose data
    has no plain place (compressed, or not in a known layer)."""
    extents: list[Extent] = []
    starts: list[int] = []
    ends: list[int] = []
    layers: list[int] = []
    offsets: list[int] = []
    pos = 0
    for entry in entries:
        try:
            start, length = int(entry["start"]), int(entry["length"])
            zero, data = bool(entry["zero"]), bool(entry["data"])
            hole = not entry.get("present", True)
            depth = int(entry.get("depth", 0))
        except (KeyError, TypeError, ValueError):
            return None
        if start != pos or length <= 0:
            return None
        pos += length
        if not zero:
            if not data or "offset" not in entry or depth >= len(files):
                return None
            starts.append(start)
            ends.append(start + length)
            layers.append(depth)
            offsets.append(int(entry["offset"]))
            hole = False
        last = extents[-1] if extents else None
        if last is not None and last.zero == zero and last.hole == hole:
            extents[-1] = Extent(last.start, last.length + length, zero, hole)
        else:
            extents.append(Extent(start, length, zero, hole))
    return Layout(files, extents, starts, ends, layers, offsets)


class MappedSource:
    """An upload source read in place from its layers' files."""

    #: Pieces may go in parallel, in any order.
    sequential = False
    #: Nothing to read ahead: the kernel reads as it sends.
    reads_ahead = False

    def __init__(self, layout: Layout, size: int, *, single_layer: bool,
                 detect_zeros: bool) -> None:
        self.size = size
        #: A single layer leaves what it does not allocate untouched.
        self.keeps_holes = single_layer
        self._layout = layout
        self._fds: list[int] = []
        self._maps: list[mmap.mmap | None] = []
        try:
            for name in layout.files:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
                self._fds.append(fd)
                self._maps.append(_map_file(fd) if detect_zeros else None)
        except BaseException:
            self.close()
            raise
        self._detect_zeros = detect_zeros
        self.finds_zeros = detect_zeros

    def sized(self, image_size: int) -> int:
        return self.size

    def extents(self) -> list[Extent]:
        return self._layout.extents

    def prefetch(self, piece: Piece) -> None:
        """Never called (``reads_ahead`` is False)."""

    def send(self, con: ImageConnection, cursor: Cursor,
             sender: Sender) -> None:
        """Send a data piece from ``cursor.offset`` to its end (all of
        it, or what a broken connection left unsent)."""
        offset, end = cursor.offset, cursor.end
        runs = (self._runs(offset, end) if self._detect_zeros
                else [(0, end - offset, False)])
        for run_start, run_end, zero in runs:
            if zero:
                sender.zero(con, cursor, offset + run_end)
                continue
            parts: list[FilePart] = [
                (self._fds[layer], at, n) for layer, at, n in
                self._layout.parts(offset + run_start, offset + run_end)]
            con.write_from_files(parts, offset + run_start,
                                 flush=sender.flush_each)
            sender.acknowledged(cursor, offset + run_end)

    def _runs(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        """Data and zero runs of guest data ``[start, end)``, compared in
        place in the mapped files."""
        parts = self._layout.parts(start, end)
        views = []
        try:
            for layer, at, n in parts:
                mapped = self._maps[layer]
                assert mapped is not None
                views.append(memoryview(mapped)[at:at + n])
            return _extents.zero_runs_of(views, ZERO_BLOCK, MIN_ZERO_REQUEST)
        finally:
            for view in views:
                view.release()
            for layer, at, n in parts:
                _unmap_pages(self._maps[layer], at, n)

    def finish(self) -> None:
        """Every piece is sent: nothing to check for an image."""

    def close(self) -> None:
        for mapped in self._maps:
            if mapped is not None:
                mapped.close()
        for fd in self._fds:
            os.close(fd)
        self._maps, self._fds = [], []

    def __enter__(self) -> MappedSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _unmap_pages(mapped: mmap.mmap | None, offset: int, length: int) -> None:
    """Drop the pages of a compared range from the mapping (the page
    cache keeps them), so that the process never holds the image."""
    if mapped is None:
        return
    start = offset - offset % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, start, offset + length - start)


def _map_file(fd: int) -> mmap.mmap | None:
    """The whole file, mapped read-only (None when it is empty)."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return None
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
