"""How a range of the image moves between a client's connection and the
backend: the one place that chooses, from what each side offers.

The connection offers zero copy on a plain socket (UNIX, TCP), not under
TLS; the backend may offer its file (``ZeroCopyFile``) or pipes spliced
from its socket (``SplicesPipes``)::

    GET, image -> client            when
    sendfile from the file          zero copy, and the backend has a file
                                    descriptor (not O_DIRECT)
    pipes spliced from the backend  zero copy, the backend splices, and the
                                    range is MIN_SPLICED or more
    the request's buffer            otherwise (TLS, O_DIRECT, a proxied or
                                    memory image, a short NBD range)

    PUT with a length, client -> image
    socket -> pipe -> file          as sendfile above
    socket -> pipe -> backend       as the spliced GET above
    the request's buffer            otherwise; written behind (``overlap``)
                                    unless TLS into local storage

A chunked PUT has no length to choose by: images.py receives it through
the buffer, each piece checked against the range before it is written.

A body spliced to a file, and a TLS body, are received in turns
(``diskferry.daemon.turns``), so that small requests do not wait behind
every upload at once.

Every path checks the ticket's operation between chunks and counts what
it moved in ``op.done``. The buffer and the pipes are lent by the
connection (``context``) and given back when the request ends.
"""

from diskferry.daemon.backends.base import (
    Backend,
    SplicesPipes,
    offers_splicing,
    offers_zero_copy_file,
)
from diskferry.daemon.handlers import overlap
from diskferry.daemon.handlers.context import (
    connection_buffer,
    connection_pipe,
    discard_pipe,
    request_pipes,
)
from diskferry.daemon.handlers.request import Connection, Request
from diskferry.daemon.turns import UPLOADS

#: Bytes sent per sendfile call between cancellation checks.
SENDFILE_CHUNK = 64 * 1024**2

#: Shortest request worth splicing: a spliced request always has a worker
#: thread, which costs about 80 us to start and join on this project's
#: 2-core VM, while copying 1 MiB once costs about 140 us; a shorter
#: request goes through the buffer, in turn and without a thread.
MIN_SPLICED = 1024 * 1024


def send(request: Request, backend: Backend, op: overlap.Operation,
         offset: int, length: int) -> None:
    """Send ``length`` bytes of the image at ``offset`` as the body of the
    answer, whose head is sent."""
    conn = request.conn
    fd = _file_descriptor(conn, backend)
    if fd is not None:
        _send_file(conn, fd, op, offset, length)
        return
    splicer = _splicer(conn, backend, length)
    if splicer is not None:
        with request_pipes(overlap.GET_PIPES) as pipes:
            overlap.send_spliced(conn, splicer, pipes, op, offset, length)
        return
    buf = connection_buffer(request, backend.buffer_size, length)
    with memoryview(buf) as view:
        overlap.send(conn, backend, view, op, offset, length)


def receive(request: Request, backend: Backend, op: overlap.Operation,
            offset: int, length: int) -> None:
    """Write the request's body of ``length`` bytes at ``offset``."""
    conn = request.conn
    fd = _file_descriptor(conn, backend)
    if fd is not None:
        _splice_to_file(request, backend.buffer_size, fd, op, offset, length)
        return
    splicer = _splicer(conn, backend, length)
    if splicer is not None:
        with request_pipes() as (pipe,):
            overlap.receive_spliced(conn, splicer, pipe, op, offset, length)
        return
    buf = connection_buffer(request, backend.buffer_size, length)
    with memoryview(buf) as view:
        overlap.receive(conn, backend, view, op, offset, length,
                        overlapped=conn.zero_copy or backend.remote,
                        turn=None if conn.zero_copy else UPLOADS.turn)


def _file_descriptor(conn: Connection, backend: Backend) -> int | None:
    """The file the kernel copies from or to, if both sides allow it."""
    if conn.zero_copy and offers_zero_copy_file(backend):
        return backend.fileno()
    return None


def _splicer(conn: Connection, backend: Backend,
             length: int) -> SplicesPipes | None:
    """The backend, if ``length`` bytes go through pipes spliced to it."""
    if (conn.zero_copy and offers_splicing(backend)
            and backend.can_splice() and length >= MIN_SPLICED):
        return backend
    return None


def _send_file(conn: Connection, fd: int, op: overlap.Operation,
               offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        op.check()
        n = min(SENDFILE_CHUNK, end - offset)
        conn.sendfile(fd, offset, n)
        offset += n
        op.done += n


def _splice_to_file(request: Request, chunk: int, fd: int,
                    op: overlap.Operation, offset: int, length: int) -> None:
    """socket -> the connection's pipe -> file, ``chunk`` bytes between
    cancellation checks."""
    pipe = connection_pipe(request)
    try:
        pos, end = offset, offset + length
        while pos < end:
            op.check()
            n = request.conn.splice_body(fd, pos, min(chunk, end - pos),
                                         pipe, UPLOADS.turn)
            pos += n
            op.done += n
    except BaseException:
        # The pipe may hold bytes of this body: never reuse it.
        discard_pipe(request.context)
        raise
