"""A piece of a copy, and how far it has got.

A copy is cut into pieces (``engine.plan``); a worker moves each one
with a ``Cursor``: the offset up to which the piece is done (acknowledged
by the server on upload, in the local image on download). A broken
connection resends the piece from there, and every step forward is
reported to the user's progress callback as it happens.
"""

from __future__ import annotations

import threading
from collections import namedtuple
from collections.abc import Callable

#: What a piece does: move data, or make a range read as zeros.
DATA = "data"
ZERO = "zero"


class Piece(namedtuple("Piece", "op offset length")):
    """One request's worth of work: ``op`` is ``DATA`` or ``ZERO``."""

    __slots__ = ()
    op: str
    offset: int
    length: int


class Progress:
    """Serializes calls of the user's progress callback across workers."""

    def __init__(self, callback: Callable[[int], None] | None) -> None:
        self._callback = callback
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        if self._callback is not None and n:
            with self._lock:
                self._callback(n)


class Cursor:
    """How far one piece has got: it is done up to ``offset`` and ends
    at ``end``."""

    __slots__ = ("offset", "end", "_report")

    def __init__(self, piece: Piece, report: Progress) -> None:
        self.offset = piece.offset
        self.end = piece.offset + piece.length
        self._report = report

    @property
    def remaining(self) -> int:
        return self.end - self.offset

    def advance(self, n: int) -> None:
        """``n`` more bytes are done."""
        self.offset += n
        self._report(n)

    def advance_to(self, offset: int) -> int:
        """The piece is done up to ``offset``; return how many bytes
        that added."""
        n = offset - self.offset
        self.offset = offset
        self._report(n)
        return n
