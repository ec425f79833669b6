"""The parallel copy engine: whole images between a local file and a URL.

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
"""

import heapq
import logging
import os
import threading
import time
from collections import namedtuple

from diskferry.client import extents as _extents
from diskferry.client import imageformat, localfile, session
from diskferry.client.connection import BUFFER_SIZE
from diskferry.client.errors import ConnectionFailed, TransferError
from diskferry.client.policy import Retry, Timeout
from diskferry.extent import Extent

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


class _Progress:
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
                for off, n in _extents.split(ext.start, ext.end, request_size):
                    yield Piece("data", off, n)
            elif zero_ranges is None:
                for off, n in _extents.split(ext.start, ext.end, MAX_ZERO_SIZE):
                    yield Piece("zero", off, n)

    if zero_ranges is None:
        return data_pieces()
    zero_pieces = (Piece("zero", off, n)
                   for start, end in zero_ranges
                   for off, n in _extents.split(start, end, MAX_ZERO_SIZE))
    return heapq.merge(data_pieces(), zero_pieces, key=lambda p: p.offset)


def _run(pieces, connections, do_piece, retry):
    """Run pieces on the connections, one thread each; return the bytes
    done per op; raise the first failure as TransferError."""
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
        while (piece := next_piece()) is not None:
            _with_retries(con, piece, do_piece, retry)
            with lock:
                done[piece.op] += piece.length

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


def _with_retries(con, piece, do_piece, retry):
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


def _open_connections(sess, count):
    return [sess.primary] + [sess.connection() for _ in range(count - 1)]


def upload(path, url, *, workers=DEFAULT_WORKERS,
           request_size=DEFAULT_REQUEST_SIZE, cafile=None, secure=True,
           unix="auto", timeout=Timeout(), retry=Retry(), progress=None,
           on_start=None, format=None):
    """Upload local raw file or block device ``path`` to transfer ``url``.

    ``format`` None probes the source first (``imageformat``) and raises
    ``UnsupportedFormat`` before any request when it is not raw: its bytes
    would be a container, not a disk. ``format="raw"`` uploads the bytes
    as they are; other formats are not supported yet.

    Holes of the source are zeroed with PATCH zero, except where the
    destination already reads zeros (its extents say so). ``progress(n)``
    is called as ``n`` more bytes of the image are done, ``on_start(size)``
    once the image size is known.
    """
    started = time.monotonic()
    report = _Progress(progress)
    src = localfile.open_source(path)
    try:
        found = imageformat.check_source(os.fsdecode(path), src.fd, src.size,
                                         format)
        if found is not None:
            log.debug("%s: %s (by %s%s)", path, found.format, found.by,
                      f"; {found.detail}" if found.detail else "")
        with session.open(url, "w", cafile=cafile, secure=secure, unix=unix,
                          timeout=timeout, buffer_size=request_size) as sess:
            size = sess.size()
            if on_start:
                on_start(size)
            if src.size > size:
                raise TransferError(
                    f"{path} ({src.size} bytes) is larger than the image "
                    f"({size} bytes)", size)
            src_extents = (_extents.file_extents(src.fd, src.size)
                           if src.kind == "file"
                           else [Extent(0, src.size, False)])
            zero_ranges = _extents.ranges(src_extents, zero=True)
            known = _destination_zeros(sess) if zero_ranges else []
            needed = _extents.subtract(zero_ranges, known)
            # Servers without the flush feature flush every PUT anyway.
            flush_each = "flush" not in sess.features
            pieces = plan(src_extents, request_size, needed)
            skipped = sum(e - s for s, e in zero_ranges) - sum(
                e - s for s, e in needed)
            report(skipped)

            def do_piece(con, op, state, end):
                offset = state["offset"]
                if op == "data":
                    con.write_from_fd(src.fd, offset, end - offset,
                                      flush=flush_each)
                elif "zero" in sess.features:
                    con.zero(offset, end - offset)
                else:
                    _put_zeros(con, offset, end - offset)
                state["offset"] = end
                report(end - offset)

            count = max(1, min(workers, sess.max_writers))
            done = _run(pieces, _open_connections(sess, count), do_piece,
                        retry)
            if not flush_each:
                _with_retries(sess.primary, Piece("flush", 0, size),
                              lambda con, *_: con.flush(), retry)
            return _result("upload", size, done, skipped, started, sess,
                           count)
    finally:
        src.close()


def download(url, path, *, workers=DEFAULT_WORKERS,
             request_size=DEFAULT_REQUEST_SIZE, cafile=None, secure=True,
             unix="auto", timeout=Timeout(), retry=Retry(), progress=None,
           on_start=None):
    """Download transfer ``url`` to local raw file or block device ``path``.

    A regular file is created (or truncated) sparse: zero ranges of the
    image are not transferred and stay holes. A block device gets its
    zero ranges zeroed locally. ``progress`` and ``on_start`` as for
    ``upload()``.
    """
    started = time.monotonic()
    report = _Progress(progress)
    with session.open(url, "r", cafile=cafile, secure=secure, unix=unix,
                      timeout=timeout, buffer_size=request_size) as sess:
        size = sess.size()
        if on_start:
            on_start(size)
        dst = localfile.open_destination(path, size)
        try:
            if "extents" in sess.features:
                image_extents = sess.walk_extents("zero")
            else:
                image_extents = [Extent(0, size, False)] if size else []
            skipped = 0

            def skipping_zeros(extents):
                # A fresh file already reads zeros: count, do not copy.
                nonlocal skipped
                for ext in extents:
                    if ext.zero:
                        skipped += ext.length
                        report(ext.length)
                    yield ext

            if dst.zeroed:
                pieces = plan(skipping_zeros(image_extents), request_size, [])
            else:
                pieces = plan(image_extents, request_size)

            def do_piece(con, op, state, end):
                offset = state["offset"]
                if op == "data":
                    def ack(n):
                        state["offset"] += n
                        report(n)
                    con.read_to_fd(dst.fd, offset, end - offset, ack,
                                   positional=dst.kind != "other")
                else:
                    localfile.zero_range(dst, offset, end - offset)
                    state["offset"] = end
                    report(end - offset)

            count = max(1, min(workers, sess.max_readers))
            done = _run(pieces, _open_connections(sess, count), do_piece,
                        retry)
            if dst.kind != "other":
                os.fsync(dst.fd)
        finally:
            dst.close()
        return _result("download", size, done, skipped, started, sess,
                       count)


def _destination_zeros(sess):
    """Ranges the destination already reads as zeros (empty if unknown)."""
    if "extents" not in sess.features:
        return []
    try:
        return _extents.ranges(sess.walk_extents("zero"), zero=True)
    except Exception as e:
        log.info("cannot get destination extents (%s); zeroing all holes", e)
        return []


def _put_zeros(con, offset, length):
    zeros = memoryview(bytes(min(length, con.buffer_size)))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        con.write(zeros[:n], offset, flush=True)
        offset += n


def _result(direction, size, done, skipped, started, sess, count):
    return TransferResult(
        direction=direction, image_size=size, data_bytes=done["data"],
        zero_bytes=done["zero"], skipped_bytes=skipped,
        seconds=time.monotonic() - started, transport=sess.transport.kind,
        transport_reason=sess.transport_reason, connections=count)
