"""How an upload's pieces reach the server.

Data goes by PUT (flushed each time when the server has no flush of its
own), zeros by PATCH zero (or a PUT of zeros on servers without it), and
zeros the destination already reads not at all. Bytes are counted by how
they went, as the server acknowledges them.
"""

from __future__ import annotations

import threading

from diskferry.client import extents as _extents
from diskferry.client.connection import ImageConnection
from diskferry.client.extents import Range
from diskferry.client.piece import DATA, ZERO, Cursor

#: How bytes the destination already read as zeros are counted.
SKIPPED = "skipped"


class Sender:
    """The server's side of an upload, shared by its workers: ``done``
    counts bytes by how they were sent (``data``, ``zero``, ``skipped``).
    """

    def __init__(self, features: frozenset[str], flush_each: bool,
                 known_zeros: list[Range]) -> None:
        self.flush_each = flush_each
        self._can_zero = ZERO in features
        self._known_zeros = known_zeros
        self._lock = threading.Lock()
        self.done = {DATA: 0, ZERO: 0, SKIPPED: 0}

    def acknowledged(self, cursor: Cursor, end: int, op: str = DATA) -> None:
        """The server holds the piece up to ``end``, sent as ``op``."""
        n = cursor.advance_to(end)
        with self._lock:
            self.done[op] += n

    def write(self, con: ImageConnection, view: memoryview,
              cursor: Cursor) -> None:
        """PUT ``view`` at the piece's offset."""
        end = cursor.offset + len(view)
        con.write(view, cursor.offset, flush=self.flush_each)
        self.acknowledged(cursor, end)

    def zero(self, con: ImageConnection, cursor: Cursor, end: int) -> None:
        """Make the piece up to ``end`` read as zeros."""
        offset = cursor.offset
        if _extents.covered(self._known_zeros, offset, end):
            self.acknowledged(cursor, end, SKIPPED)
            return
        if self._can_zero:
            con.zero(offset, end - offset)
        else:
            _put_zeros(con, offset, end - offset)
        self.acknowledged(cursor, end, ZERO)


def _put_zeros(con: ImageConnection, offset: int, length: int) -> None:
    zeros = memoryview(bytes(min(length, con.buffer_size)))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        con.write(zeros[:n], offset, flush=True)
        offset += n
