"""The local end of a copy: what an upload reads, what a download writes.

An upload reads a ``Source``: a raw file or block device (``raw``),
standard input (``stream``), a qcow2 chain read in place from its files
(``mapped``), or any image qemu reads, through qemu-nbd (``imagecopy``).
A download writes a ``Destination``: a raw file with its resume journal
or a block device (``raw``), standard output (``stream``), a new qcow2
written by the client (``qcow2``), or a qcow2 overlay through qemu-nbd
(``imagecopy``). ``copy`` picks one from a table; the engine moves the
pieces through it, one way: engine -> source or destination ->
connection.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, Self

from diskferry.client.connection import ImageConnection
from diskferry.client.extents import Range
from diskferry.client.piece import Cursor, Piece
from diskferry.client.sender import Sender
from diskferry.extent import Extent


class Source(Protocol):
    """A local disk image an upload reads.

    ``sequential``: its pieces must go in order on one connection (a
    stream). ``keeps_holes``: what it does not allocate is left untouched
    in the destination (a single layer), rather than zeroed.
    ``reads_ahead``: ``prefetch`` is worth calling. ``finds_zeros``: it
    may send a run of zeros found in its data as zero (``Sender.zero``),
    so the destination's own zeros are worth knowing even where its
    extents show no hole.
    """

    @property
    def sequential(self) -> bool: ...

    @property
    def keeps_holes(self) -> bool: ...

    @property
    def reads_ahead(self) -> bool: ...

    @property
    def finds_zeros(self) -> bool: ...

    def sized(self, image_size: int) -> int:
        """The bytes it holds, given the destination image's size (a
        stream of unknown length takes the image's)."""

    def extents(self) -> list[Extent]:
        """Where it holds data and zeros, in order."""

    def prefetch(self, piece: Piece) -> None:
        """Start reading ``piece``, which the caller sends next."""

    def send(self, con: ImageConnection, cursor: Cursor,
             sender: Sender) -> None:
        """Send the data piece from ``cursor.offset`` to its end."""

    def finish(self) -> None:
        """Every piece is sent: raise if the source holds more."""

    def __enter__(self) -> Self: ...

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class Destination(Protocol):
    """A local disk image a download writes.

    ``sequential`` as for ``Source``; ``zeroed``: it reads zeros
    everywhere now, so zero extents need no writing; ``done``: ranges it
    already holds (a resumed download), sorted.
    """

    @property
    def sequential(self) -> bool: ...

    @property
    def zeroed(self) -> bool: ...

    @property
    def done(self) -> list[Range]: ...

    def receive(self, con: ImageConnection, cursor: Cursor) -> None:
        """GET the data piece from ``cursor.offset`` to its end, and
        write it."""

    def zero(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros."""

    def commit(self) -> None:
        """Every piece is written: make the image durable and complete."""

    def __enter__(self) -> Self: ...

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...
