"""Standard input and output: raw streams, read or written in order.

A pipe has no offsets, so a stream goes on one connection, piece after
piece. An upload keeps each piece until the server acknowledges it, so
that a retry sends it again without reading the stream twice; a download
writes every byte, zeros included (a pipe has no holes).
"""

from __future__ import annotations

import os
import select
from types import TracebackType

from diskferry.client import localfile
from diskferry.client.connection import ImageConnection
from diskferry.client.errors import ConnectionFailed, OutputClosed, TransferError
from diskferry.client.extents import Range
from diskferry.client.piece import Cursor, Piece
from diskferry.client.sender import Sender
from diskferry.extent import Extent


class StreamSource:
    """Standard input: a raw stream of ``size`` bytes (None: the image's
    size), read in order. With ``detect_zeros``, a piece of zeros is sent
    as zero, or not at all where the destination already reads zeros."""

    sequential = True
    keeps_holes = False
    reads_ahead = False

    def __init__(self, size: int | None, request_size: int,
                 detect_zeros: bool, fd: int = 0) -> None:
        self.size = size
        self._fd = fd
        self._buf = bytearray(request_size)
        self._held = (-1, 0)
        self._zeros = bytes(request_size) if detect_zeros else None
        self.finds_zeros = detect_zeros

    def sized(self, image_size: int) -> int:
        if self.size is None:
            self.size = image_size
        return self.size

    def extents(self) -> list[Extent]:
        return [Extent(0, self.size, False)] if self.size else []

    def prefetch(self, piece: Piece) -> None:
        """Never called (``reads_ahead`` is False)."""

    def send(self, con: ImageConnection, cursor: Cursor,
             sender: Sender) -> None:
        offset = cursor.offset
        length = cursor.remaining
        if self._held != (offset, length):
            self._fill(offset, length)
        view = memoryview(self._buf)[:length]
        if self._zeros is not None and view == self._zeros[:length]:
            sender.zero(con, cursor, cursor.end)
        else:
            sender.write(con, view, cursor)

    def _fill(self, offset: int, length: int) -> None:
        view = memoryview(self._buf)[:length]
        got = 0
        while got < length:
            n = os.readv(self._fd, [view[got:]])
            if not n:
                raise TransferError(
                    f"standard input ended after {offset + got} bytes; "
                    f"expected {self.size} (pass --size for a shorter "
                    f"stream)")
            got += n
        self._held = (offset, length)

    def finish(self) -> None:
        if os.read(self._fd, 1):
            raise TransferError(
                f"standard input holds more than {self.size} bytes (the "
                f"image's size, or --size)")

    def __enter__(self) -> StreamSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Standard input is not ours to close."""


class StreamDestination:
    """Standard output: a raw stream written in order, zeros included."""

    sequential = True
    zeroed = False
    done: list[Range] = []

    def __init__(self, fd: int = 1) -> None:
        self._fd = fd

    def receive(self, con: ImageConnection, cursor: Cursor) -> None:
        try:
            con.read_to_fd(self._fd, cursor.offset, cursor.remaining,
                           cursor.advance, positional=False)
        except (OSError, ConnectionFailed) as e:
            # A write to a pipe without a reader fails as a broken
            # socket would (EPIPE): ask the pipe which end it was.
            if self._reader_gone():
                raise OutputClosed("standard output was closed") from e
            raise

    def zero(self, offset: int, length: int) -> None:
        zeros = memoryview(bytes(min(length, localfile.ZERO_CHUNK)))
        try:
            while length:
                n = os.write(self._fd, zeros[:length])
                length -= n
        except BrokenPipeError as e:
            raise OutputClosed("standard output was closed") from e

    def _reader_gone(self) -> bool:
        """True when nothing reads the stream any more (a pipe whose
        reader exited polls as an error)."""
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP)
                   for _, events in poller.poll(0))

    def commit(self) -> None:
        """Nothing to sync or rename."""

    def __enter__(self) -> StreamDestination:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Standard output is not ours to close."""
