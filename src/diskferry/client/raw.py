"""Raw files and block devices, moved by the kernel.

An upload sends a file's data ranges (found with ``SEEK_DATA``) with
``sendfile``; a download splices each body into the file. A download
into a regular file writes ``NAME.part`` with its journal (``resume``)
and renames it once complete; a block device is written in place.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import namedtuple
from types import TracebackType

from diskferry.client import extents as _extents
from diskferry.client import localfile
from diskferry.client.connection import ImageConnection
from diskferry.client.extents import Range
from diskferry.client.localfile import LocalImage, LocalPath
from diskferry.client.piece import Cursor, Piece
from diskferry.client.resume import Journal
from diskferry.client.sender import Sender
from diskferry.extent import Extent

log = logging.getLogger("diskferry.client")


class RawSource:
    """A raw file or block device: mapped with SEEK_DATA, sent by the
    kernel (sendfile, or through a buffer under TLS)."""

    keeps_holes = False
    sequential = False
    #: Nothing to read ahead: the kernel reads as it sends.
    reads_ahead = False
    #: Its data is sent as it is, zeros included.
    finds_zeros = False

    def __init__(self, local: LocalImage) -> None:
        self._local = local
        self.size = local.size

    def sized(self, image_size: int) -> int:
        return self.size

    def extents(self) -> list[Extent]:
        if self._local.kind == "file":
            return _extents.file_extents(self._local.fd, self.size)
        return [Extent(0, self.size, False)]

    def prefetch(self, piece: Piece) -> None:
        """Never called (``reads_ahead`` is False)."""

    def send(self, con: ImageConnection, cursor: Cursor,
             sender: Sender) -> None:
        con.write_from_fd(self._local.fd, cursor.offset, cursor.remaining,
                          flush=sender.flush_each)
        sender.acknowledged(cursor, cursor.end)

    def finish(self) -> None:
        """Every piece is sent: nothing to check for a file."""

    def __enter__(self) -> RawSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """The caller closes the file it opened."""


class _Partial(namedtuple("_Partial", "part journal")):
    """A download into a regular file, until it is complete: written as
    ``part``, with the journal of what is synced."""

    __slots__ = ()
    part: str
    journal: Journal


class RawDestination:
    """A raw file (written as NAME.part with its journal, renamed when
    complete) or a block device (written in place)."""

    sequential = False

    def __init__(self, path: LocalPath, size: int,
                 resume: bool = False) -> None:
        self.path = path
        part = _part_path(path)
        self._partial: _Partial | None = None
        if part is None:
            self._local = localfile.open_destination(path, size)
        elif resume and os.path.exists(part):
            journal = Journal.load(part, size)
            self._local = localfile.open_existing(part, size)
            self._partial = _Partial(part, journal)
        else:
            self._local = localfile.open_destination(part, size)
            self._partial = _Partial(part, Journal.create(part, size))
        if self._partial is not None:
            self._partial.journal.attach(self._local.fd)
        self.zeroed = self._local.zeroed
        self.done: list[Range] = (self._partial.journal.done
                                  if self._partial else [])

    def receive(self, con: ImageConnection, cursor: Cursor) -> None:
        offset = cursor.offset
        try:
            con.read_to_fd(self._local.fd, offset, cursor.remaining,
                           cursor.advance,
                           positional=self._local.kind != "other")
        finally:
            self._record(offset, cursor.offset)

    def zero(self, offset: int, length: int) -> None:
        if self._local.kind == "file":
            localfile.punch_hole(self._local, offset, length)
        else:
            localfile.zero_range(self._local, offset, length)
        self._record(offset, offset + length)

    def _record(self, start: int, end: int) -> None:
        if self._partial is not None:
            self._partial.journal.record(start, end)

    def commit(self) -> None:
        if self._local.kind != "other":
            os.fsync(self._local.fd)
        partial, self._partial = self._partial, None
        if partial is not None:
            os.rename(partial.part, self.path)
            partial.journal.remove()

    def __enter__(self) -> RawDestination:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Interrupted or failed: what is on disk is recorded, and the
        # .part kept for a resume.
        partial = self._partial
        try:
            if partial is not None:
                _keep(partial)
        finally:
            self._local.close()


def _keep(partial: _Partial) -> None:
    """Record what the .part holds, and close its journal."""
    try:
        partial.journal.checkpoint()
    except OSError as e:
        log.warning("cannot record what %s holds: %s", partial.part, e)
    finally:
        partial.journal.close()


def _part_path(path: LocalPath) -> str | None:
    """Where a download into ``path`` is written until complete: NAME.part
    for a regular file (or a new one), None for a device or a pipe."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return os.fsdecode(path) + ".part"
    return os.fsdecode(path) + ".part" if stat.S_ISREG(st.st_mode) else None
