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

What a piece does is the caller's ``do_piece``: ``copy`` moves raw files
(``sendfile``/``splice``), ``imagecopy`` images served by qemu-nbd.
"""

import heapq
import logging
import threading
import time
from collections import namedtuple

from diskferry.client import extents as _extents
from diskferry.client.connection import BUFFER_SIZE
from diskferry.client.errors import ConnectionFailed, TransferError
from diskferry.extent import split

log = logging.getLogger("diskferry.client")

DEFAULT_WORKERS = 4
DEFAULT_REQUEST_SIZE = BUFFER_SIZE

#: Largest zero request: big enough that a huge hole costs a few requests,
#: small enough that each completes well within a read timeout.
MAX_ZERO_SIZE = 1024**3


class TransferResult(namedtuple("TransferResult", (
        "direction image_size data_bytes zero_bytes skipped_bytes seconds "
        "transport transport_reason connections"))):
    """What a copy did: sizes in bytes (``data_bytes`` moved as data,
    ``zero_bytes`` zeroed by request, ``skipped_bytes`` already zero),
    time in seconds, the transport used and why."""

    __slots__ = ()

    @property
    def gib_per_second(self):
        return self.image_size / self.seconds / 1024**3 if self.seconds else 0.0


class Piece(namedtuple("Piece", "op offset length")):
    """One request's worth of work: ``op`` is "data" or "zero"."""

    __slots__ = ()


class Progress:
    """Serializes calls of the user's progress callback across workers."""

    def __init__(self, callback):
        self._callback = callback
        self._lock = threading.Lock()

    def __call__(self, n):
        if self._callback is not None and n:
            with self._lock:
                self._callback(n)


def plan(extents, request_size, zero_ranges=None):
    """Yield the pieces of a copy in image order, lazily.

    Data extents are cut into ``request_size`` pieces. Zero pieces come
    from ``zero_ranges`` (sorted ``(start, end)``: what must be zeroed)
    or, when it is None, from the zero extents. Lazy, so that a huge
    image never has its pieces in memory at once, and in order, so that
    workers move through the image roughly sequentially.
    """
    def data_pieces():
        for ext in extents:
            if not ext.zero:
                for off, n in split(ext.start, ext.end, request_size):
                    yield Piece("data", off, n)
            elif zero_ranges is None:
                for off, n in split(ext.start, ext.end, MAX_ZERO_SIZE):
                    yield Piece("zero", off, n)

    if zero_ranges is None:
        return data_pieces()
    zero_pieces = (Piece("zero", off, n)
                   for start, end in zero_ranges
                   for off, n in split(start, end, MAX_ZERO_SIZE))
    return heapq.merge(data_pieces(), zero_pieces, key=lambda p: p.offset)


def run(pieces, connections, do_piece, retry, prefetch=None):
    """Run pieces on the connections, one thread each; return the bytes
    done per op; raise the first failure as TransferError.

    ``prefetch(piece)``, when given, is called in each worker for every
    piece it will do, in order, one piece ahead of ``do_piece``: a
    source can read the next piece while the current one is sent.
    """
    lock = threading.Lock()
    queue = iter(pieces)
    failed = []
    done = {"data": 0, "zero": 0}

    def next_piece():
        with lock:
            if failed:
                return None
            return next(queue, None)

    def work(con):
        piece = next_piece()
        if piece is not None and prefetch is not None:
            prefetch(piece)
        while piece is not None:
            following = next_piece()
            if following is not None and prefetch is not None:
                prefetch(following)
            with_retries(con, piece, do_piece, retry)
            with lock:
                done[piece.op] += piece.length
            piece = following

    def worker(con):
        try:
            work(con)
        except BaseException as e:
            with lock:
                failed.append(e)
        finally:
            con.close()

    threads = [threading.Thread(target=worker, args=(con,),
                                name=f"diskferry-copy-{i}", daemon=True)
               for i, con in enumerate(connections[1:], 1)]
    for t in threads:
        t.start()
    # The calling thread is a worker too, on the session's own connection,
    # which must survive for the final flush: keep it open.
    try:
        work(connections[0])
    except BaseException as e:
        with lock:
            failed.append(e)
    for t in threads:
        t.join()
    if failed:
        error = failed[0]
        if isinstance(error, TransferError) or not isinstance(error, Exception):
            raise error
        raise TransferError(str(error), getattr(error, "offset", 0)) from error
    return done


def with_retries(con, piece, do_piece, retry):
    """Do one piece, resending from the last acknowledged offset when the
    connection breaks, within the retry budget."""
    state = {"offset": piece.offset}
    end = piece.offset + piece.length
    while True:
        try:
            do_piece(con, piece.op, state, end)
            return
        except ConnectionFailed as e:
            try:
                retry = retry.increment(e)
            except Exception as spent:
                raise TransferError(
                    f"{piece.op} failed: {spent}", state["offset"]) from e
            log.warning("%s at offset %d failed (%s); retrying",
                        piece.op, state["offset"], e)
            retry.sleep()
        except Exception as e:
            raise TransferError(f"{piece.op} failed: {e}",
                                state["offset"]) from e


def open_connections(sess, count):
    return [sess.primary] + [sess.connection() for _ in range(count - 1)]


def destination_zeros(sess):
    """Ranges the destination already reads as zeros (empty if unknown)."""
    if "extents" not in sess.features:
        return []
    try:
        return _extents.ranges(sess.walk_extents("zero"), zero=True)
    except Exception as e:
        log.info("cannot get destination extents (%s); zeroing all holes", e)
        return []


class Sender:
    """How an upload's pieces reach the server: PUT (flushing each one when
    the server has no flush of its own), PATCH zero (or PUT zeros, for
    servers without it), nothing for zeros the destination already
    reads; progress reported, and bytes counted by how they were sent
    (``done``), as the server acknowledges."""

    def __init__(self, sess, flush_each, known_zeros, report):
        self.flush_each = flush_each
        self._can_zero = "zero" in sess.features
        self._known_zeros = known_zeros
        self._report = report
        self._lock = threading.Lock()
        self.done = {"data": 0, "zero": 0, "skipped": 0}

    def acknowledged(self, state, end, op="data"):
        """The server holds the piece up to ``end``, sent as ``op``."""
        length = end - state["offset"]
        with self._lock:
            self.done[op] += length
        self._report(length)
        state["offset"] = end

    def write(self, con, view, state):
        """PUT ``view`` at the piece's offset."""
        end = state["offset"] + len(view)
        con.write(view, state["offset"], flush=self.flush_each)
        self.acknowledged(state, end)

    def zero(self, con, state, end):
        """Make the piece up to ``end`` read as zeros."""
        offset = state["offset"]
        if _extents.covered(self._known_zeros, offset, end):
            self.acknowledged(state, end, "skipped")
            return
        if self._can_zero:
            con.zero(offset, end - offset)
        else:
            _put_zeros(con, offset, end - offset)
        self.acknowledged(state, end, "zero")


def _put_zeros(con, offset, length):
    zeros = memoryview(bytes(min(length, con.buffer_size)))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        con.write(zeros[:n], offset, flush=True)
        offset += n


def flush(sess, retry):
    """The upload's one flush, on the session's own connection."""
    with_retries(sess.primary, Piece("flush", 0, 0),
                 lambda con, *_: con.flush(), retry)


def result(direction, size, done, skipped, started, sess, count):
    return TransferResult(
        direction=direction, image_size=size, data_bytes=done["data"],
        zero_bytes=done["zero"], skipped_bytes=skipped,
        seconds=time.monotonic() - started, transport=sess.transport.kind,
        transport_reason=sess.transport_reason, connections=count)
