"""The copy engine: pieces of work, run in parallel with retries.

A copy is planned first, then run::

    extents of the source ──> plan: data pieces of request_size,
                                     zero ranges (or nothing, when the
                                     destination already reads zeros)
                          ──> N workers, each with its own keep-alive
                              connection, take pieces in order
                          ──> one flush (upload) / fsync (download)

N is ``min(workers, max_writers)`` for an upload and ``min(workers,
max_readers)`` for a download, as the server asks. A piece whose
connection breaks is sent again on a new connection from the last
offset the server acknowledged (a download resumes mid-piece), as the
``Retry`` policy allows; any other failure stops every worker and is
raised as ``TransferError`` naming the offset.

Each piece goes one way: a worker hands it to ``UploadPieces`` or
``DownloadPieces``, which hand it to the local ``Source`` or
``Destination`` (``local``), which moves it over the connection.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from diskferry.client import extents as _extents
from diskferry.client.connection import BUFFER_SIZE, ImageConnection
from diskferry.client.errors import (
    ConnectionFailed,
    OutputClosed,
    TransferError,
)
from diskferry.client.extents import Range
from diskferry.client.piece import DATA, ZERO, Cursor, Piece, Progress
from diskferry.client.policy import Retry
from diskferry.client.sender import Sender
from diskferry.client.session import Session
from diskferry.extent import Extent, split

if TYPE_CHECKING:
    from diskferry.client.local import Destination, Source

__all__ = ["DEFAULT_REQUEST_SIZE", "DEFAULT_WORKERS", "DownloadPieces",
           "Piece", "TransferResult", "UploadPieces", "plan", "run"]

log = logging.getLogger("diskferry.client")

DEFAULT_WORKERS = 4
DEFAULT_REQUEST_SIZE = BUFFER_SIZE

#: Largest zero request: big enough that a huge hole costs a few requests,
#: small enough that each completes well within a read timeout.
MAX_ZERO_SIZE = 1024**3

#: What a worker does with a piece on its connection.
MovePiece = Callable[[ImageConnection, Piece, Cursor], None]


class TransferResult(namedtuple("TransferResult", (
        "direction image_size data_bytes zero_bytes skipped_bytes seconds "
        "transport transport_reason connections"))):
    """What a copy did: sizes in bytes (``data_bytes`` moved as data,
    ``zero_bytes`` zeroed by request, ``skipped_bytes`` already zero, or
    left as it was), time in seconds, the transport used and why."""

    __slots__ = ()
    direction: str
    image_size: int
    data_bytes: int
    zero_bytes: int
    skipped_bytes: int
    seconds: float
    transport: str
    transport_reason: str
    connections: int

    @property
    def copied_bytes(self) -> int:
        """The bytes of the image the copy covered: all of it, except
        for an upload of a shorter source, which leaves the rest as it
        was."""
        return self.data_bytes + self.zero_bytes + self.skipped_bytes

    @property
    def gib_per_second(self) -> float:
        """The copy's rate over the bytes it covered."""
        return self.copied_bytes / self.seconds / 1024**3 if self.seconds \
            else 0.0


def plan(extents: Iterable[Extent], request_size: int,
         zero_ranges: list[Range] | None = None) -> Iterable[Piece]:
    """Yield the pieces of a copy in image order, lazily.

    Data extents are cut into ``request_size`` pieces. Zero pieces come
    from ``zero_ranges`` (sorted ``(start, end)``: what must be zeroed)
    or, when it is None, from the zero extents. Lazy, so that a huge
    image never has its pieces in memory at once, and in order, so that
    workers move through the image roughly sequentially.
    """
    def data_pieces() -> Iterator[Piece]:
        for ext in extents:
            if not ext.zero:
                for off, n in split(ext.start, ext.end, request_size):
                    yield Piece(DATA, off, n)
            elif zero_ranges is None:
                for off, n in split(ext.start, ext.end, MAX_ZERO_SIZE):
                    yield Piece(ZERO, off, n)

    if zero_ranges is None:
        return data_pieces()
    zero_pieces = (Piece(ZERO, off, n)
                   for start, end in zero_ranges
                   for off, n in split(start, end, MAX_ZERO_SIZE))
    return heapq.merge(data_pieces(), zero_pieces, key=lambda p: p.offset)


class UploadPieces:
    """An upload's pieces: data read from the source, zeros sent (or
    skipped) by the sender."""

    def __init__(self, source: Source, sender: Sender) -> None:
        self._source = source
        self._sender = sender

    def __call__(self, con: ImageConnection, piece: Piece,
                 cursor: Cursor) -> None:
        if piece.op == DATA:
            self._source.send(con, cursor, self._sender)
        else:
            self._sender.zero(con, cursor, cursor.end)


class DownloadPieces:
    """A download's pieces: data received into the destination, zeros
    made there."""

    def __init__(self, destination: Destination) -> None:
        self._destination = destination

    def __call__(self, con: ImageConnection, piece: Piece,
                 cursor: Cursor) -> None:
        if piece.op == DATA:
            self._destination.receive(con, cursor)
        else:
            self._destination.zero(cursor.offset, cursor.remaining)
            cursor.advance_to(cursor.end)


class _Run:
    """What the workers of one run share: the pieces still to do, the
    first failure, and the bytes done per op."""

    def __init__(self, pieces: Iterable[Piece], move: MovePiece, retry: Retry,
                 report: Progress,
                 prefetch: Callable[[Piece], None] | None) -> None:
        self._queue = iter(pieces)
        self._move = move
        self._retry = retry
        self._report = report
        self._prefetch = prefetch
        self._lock = threading.Lock()
        self.failed: list[BaseException] = []
        self.done = {DATA: 0, ZERO: 0}

    def _next_piece(self) -> Piece | None:
        with self._lock:
            if self.failed:
                return None
            return next(self._queue, None)

    def work(self, con: ImageConnection) -> None:
        """Do pieces on ``con`` until none is left (or one failed)."""
        prefetch = self._prefetch
        piece = self._next_piece()
        if piece is not None and prefetch is not None:
            prefetch(piece)
        while piece is not None:
            following = self._next_piece()
            if following is not None and prefetch is not None:
                prefetch(following)
            with_retries(con, piece, self._move, self._retry, self._report)
            with self._lock:
                self.done[piece.op] += piece.length
            piece = following

    def fail(self, error: BaseException) -> None:
        with self._lock:
            self.failed.append(error)

    def worker(self, con: ImageConnection) -> None:
        """A worker thread: its connection is its own, closed at the end."""
        try:
            self.work(con)
        except BaseException as e:
            self.fail(e)
        finally:
            con.close()

    def raise_failure(self) -> None:
        if not self.failed:
            return
        error = self.failed[0]
        if isinstance(error, TransferError | OutputClosed) or \
                not isinstance(error, Exception):
            raise error
        raise TransferError(str(error), getattr(error, "offset", None)) \
            from error


def run(pieces: Iterable[Piece], connections: list[ImageConnection],
        move: MovePiece, retry: Retry, report: Progress,
        prefetch: Callable[[Piece], None] | None = None) -> dict[str, int]:
    """Run pieces on the connections, one thread each; return the bytes
    done per op; raise the first failure as TransferError.

    ``prefetch(piece)``, when given, is called in each worker for every
    piece it will do, in order, one piece ahead of ``move``: a source
    can read the next piece while the current one is sent.
    """
    shared = _Run(pieces, move, retry, report, prefetch)
    threads = [threading.Thread(target=shared.worker, args=(con,),
                                name=f"diskferry-copy-{i}", daemon=True)
               for i, con in enumerate(connections[1:], 1)]
    for t in threads:
        t.start()
    # The calling thread is a worker too, on the session's own connection,
    # which must survive for the final flush: keep it open.
    try:
        shared.work(connections[0])
    except BaseException as e:
        shared.fail(e)
    for t in threads:
        t.join()
    shared.raise_failure()
    return shared.done


def with_retries(con: ImageConnection, piece: Piece, move: MovePiece,
                 retry: Retry, report: Progress) -> None:
    """Do one piece, resending from the last acknowledged offset when the
    connection breaks, within the retry budget."""
    cursor = Cursor(piece, report)
    while True:
        try:
            move(con, piece, cursor)
            return
        except ConnectionFailed as e:
            try:
                retry = retry.increment(e)
            except Exception as spent:
                raise TransferError(str(spent), cursor.offset) from e
            log.warning("%s at offset %d failed (%s); retrying",
                        piece.op, cursor.offset, e)
            retry.sleep()
        except (TransferError, OutputClosed):
            # Already says what is wrong (and where, when it matters).
            raise
        except Exception as e:
            raise TransferError(str(e), cursor.offset) from e


def open_connections(sess: Session, count: int) -> list[ImageConnection]:
    return [sess.primary] + [sess.connection() for _ in range(count - 1)]


def destination_zeros(sess: Session) -> list[Range]:
    """Ranges the destination already reads as zeros (empty if unknown)."""
    if "extents" not in sess.features:
        return []
    try:
        return _extents.ranges(sess.walk_extents("zero"), zero=True)
    except Exception as e:
        log.info("cannot get destination extents (%s); zeroing all holes", e)
        return []


def _flush(con: ImageConnection, piece: Piece, cursor: Cursor) -> None:
    con.flush()


def flush(sess: Session, retry: Retry) -> None:
    """The upload's one flush, on the session's own connection."""
    with_retries(sess.primary, Piece("flush", 0, 0), _flush, retry,
                 Progress(None))


def result(direction: str, size: int, done: dict[str, int], skipped: int,
           started: float, sess: Session, count: int) -> TransferResult:
    return TransferResult(
        direction=direction, image_size=size, data_bytes=done[DATA],
        zero_bytes=done[ZERO], skipped_bytes=skipped,
        seconds=time.monotonic() - started, transport=sess.transport.kind,
        transport_reason=sess.transport_reason, connections=count)
