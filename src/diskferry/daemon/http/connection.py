"""One client connection: reading request heads and bodies, writing responses.

A connection owns a socket and a small receive buffer. The head of each
request is read into the buffer; bytes past the head (the start of a
body) stay there and are handed out first when the body is read. Large
bodies and responses bypass the buffer: ``readinto`` receives straight
into the caller's buffer, and ``sendfile`` moves file data to the socket
in the kernel when the transport allows it (not TLS).

Timeouts: plain sockets stay in blocking mode with kernel timeouts
(``SO_RCVTIMEO``/``SO_SNDTIMEO``), so that ``os.sendfile`` can send a
whole range in one call; TLS sockets use Python's socket timeout. Two
bounds apply while waiting for a request:

    idle timeout   between requests, until the first byte of a head
                   (the ticket's inactivity_timeout once one is used)
    head deadline  from that first byte (for the first request of a
                   connection: from its start, the server's accept, and
                   at most ``first_head_timeout``) to the end of the
                   head; past it the request is answered 408 and the
                   connection closed, however often bytes trickle in

The connection owns the framing: ``read_request`` reads a head within
these bounds, parses it, and sets up its body from Content-Length or
chunked coding and ``Expect: 100-continue``; after the answer,
``reusable`` says whether the next head may be read (the client keeps
the connection, the body was consumed, nothing asked to close).

State of the body of the current request (a small table, as h11 keeps):

    body_left > 0, continue pending   Expect: 100-continue not answered yet
    body_left > 0                     body being read
    body_left == 0                    body consumed; next head may be read

A chunked body (``Transfer-Encoding: chunked``) has no length: it is read
a chunk at a time, each chunk-size line bounded (``parse.MAX_CHUNK_LINE``)
and each chunk's trailing CRLF checked; trailers after the last chunk are
read, bounded as header lines, and dropped, so that no trailer can change
a header the request was authorized or placed by. A chunked body is read
through ``readinto`` only: the splice paths need a length up front.

Per response, ``extra_headers`` (CORS) go on whatever answer the request
gets, errors included, and ``close_after`` (``close=y``) adds
``Connection: close`` and closes the connection after the answer. The
answer to a HEAD request (``no_body``) never has a body, errors included.

A response is complete when its declared Content-Length was sent. If a
handler leaves body bytes unread, the stream is out of sync and the
connection is closed after the response.
"""

import fcntl
import os
import socket
import ssl
import struct
import termios
import time
from collections.abc import Callable
from contextlib import nullcontext
from http import HTTPStatus
from typing import TypeAlias, TypeVar

from diskferry.daemon.http import parse
from diskferry.daemon.http.parse import RequestHead
from diskferry.daemon.turns import Turn
from diskferry.errors import (
    BadRequest,
    ConnectionGone,
    HeadersTooLarge,
    RequestTimeout,
    ServerError,
)
from diskferry.fileio import pwrite_all
from diskferry.pipe import Pipe

#: Bytes asked of recv() when reading a head; also bounds how much of a
#: body can land in the head buffer.
HEAD_RECV_SIZE = 64 * 1024

#: Errors of a socket operation meaning the peer is gone or timed out
#: (EAGAIN is how a kernel socket timeout shows on a blocking socket).
PEER_ERRORS = (ConnectionError, TimeoutError, BlockingIOError, ssl.SSLError)

#: Bytes received per step when draining a refused body.
DISCARD_SCRATCH = 64 * 1024

#: Seconds a peer has to send a whole request head once it started one.
#: A client sends its head in one packet, so this bounds only peers that
#: trickle bytes to hold a thread (slowloris), which the idle timeout
#: alone never cuts: each byte restarts it. nginx allows 60 s
#: (client_header_timeout), Apache 20-40 s (mod_reqtimeout);
#: ovirt-imageio has no such bound.
HEAD_TIMEOUT = 30.0

#: What a body is received into: a caller's reused buffer or a view of it.
Writable: TypeAlias = bytearray | memoryview

#: Longest body whose head waits for it under TLS: head and body then
#: go in one record and one system call. A small ranged GET, the request
#: that waits behind busy threads for the GIL after each system call, is
#: answered with one call fewer (and one poll fewer); a longer body would
#: be copied once more for nothing.
HELD_HEAD_BODY = 64 * 1024

#: The most bytes one TLS record takes on the wire (RFC 5246 and 8446):
#: with at least this much received, a whole record is here.
MAX_TLS_RECORD = 5 + 2**14 + 2048

#: The most a TLS body receives in one turn. A socket's buffer grows with
#: what its reader takes, so without a bound a few connections took whole
#: bodies each turn while others took 64 KiB: 256 TLS uploads, PUT p99
#: 15-20 s against 3.3 s with this bound (bench/results/20261208-turns.md).
TLS_TURN_BYTES = 256 * 1024

#: What a response body is sent from.
Readable: TypeAlias = bytes | bytearray | memoryview

#: What one receive step returns: a count (recv_into, splice) or bytes.
_Received = TypeVar("_Received", int, bytes)


class Connection:
    """A client connection, used by one thread at a time."""

    def __init__(self, sock: socket.socket, *, tls: bool = False,
                 timeout: float = 60.0,
                 head_timeout: float = HEAD_TIMEOUT,
                 first_head_timeout: float | None = None,
                 started: float | None = None) -> None:
        self.sock = sock
        self.tls = tls
        self.head_timeout = head_timeout
        # The first head's deadline runs from the connection's start (its
        # accept, when the server says: the handshake counts), and may be
        # shorter: a connection that never sent a request proves nothing.
        self._head_started: float | None = (
            time.monotonic() if started is None else started)
        self._head_limit = (head_timeout if first_head_timeout is None
                            else min(head_timeout, first_head_timeout))
        #: When the current request's head began: its first byte (the
        #: connection's start for the first one); None while idle.
        self.request_started: float | None = None
        self._buf = bytearray()
        self.body_left = 0
        self.chunked = False
        self._chunk_left = 0
        self._chunked_done = True
        self._continue_pending = False
        self.extra_headers: dict[str, str] = {}
        self.close_after = False
        self.no_body = False
        self.keep_alive = False
        self._response_left = 0
        self.response_started = False
        #: A small TLS response's head, sent with its body's first bytes.
        self._held_head = b""
        #: The status of the response started, for the access log.
        self.status: int | None = None
        self.closed = False
        self.timeout = timeout
        self._apply_timeout(timeout)

    # Timeouts

    def set_timeout(self, seconds: float) -> None:
        """Bound every blocking receive and send on this connection."""
        if seconds != self.timeout:
            self.timeout = seconds
            self._apply_timeout(seconds)

    def _apply_timeout(self, seconds: float) -> None:
        if self.tls:
            self.sock.settimeout(seconds)
            return
        sec = int(seconds)
        usec = int((seconds - sec) * 1e6)
        tv = struct.pack("ll", sec, usec)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)

    # Reading

    def read_request(self) -> RequestHead | None:
        """Read and parse the next request head and frame its body; None
        if the peer closed cleanly between requests.

        After it, the body (Content-Length or chunked, behind an
        ``Expect: 100-continue`` if asked) is read with the read methods,
        and ``reusable`` says whether another request may follow. A head
        that breaks a limit or cannot be parsed raises its RequestError.
        """
        self.response_started = False
        self._held_head = b""
        self.status = None
        self.extra_headers = {}
        self.close_after = False
        self.no_body = False
        self.keep_alive = False
        raw = self._read_head_bytes()
        if raw is None:
            return None
        head = parse.parse_head(raw)
        self.no_body = head.method == "HEAD"
        self.start_body(head.content_length or 0, head.expects_continue,
                        head.chunked)
        self.keep_alive = head.keep_alive
        return head

    @property
    def reusable(self) -> bool:
        """True when the next request may be read after this answer: the
        client keeps the connection, the body was read to its end, and no
        one asked to close after the answer."""
        return self.keep_alive and self.body_done and not self.close_after

    def _read_head_bytes(self) -> bytes | None:
        """Read the next request head; None if the peer closed cleanly.

        Enforces the head limits while reading, so that a peer cannot make
        the server buffer more than ``parse.MAX_HEAD`` bytes, nor take
        longer than ``head_timeout`` seconds to send it.
        """
        idle = self.timeout
        started, self._head_started = self._head_started, None
        limit, self._head_limit = self._head_limit, self.head_timeout
        self.request_started = started
        try:
            return self._read_head(idle, started, limit)
        finally:
            self.set_timeout(idle)

    def _read_head(self, idle: float, started: float | None,
                   limit: float) -> bytes | None:
        start = 0
        while True:
            end = self._buf.find(b"\r\n\r\n", max(0, start - 3))
            if end != -1:
                head = bytes(self._buf[:end])
                del self._buf[:end + 4]
                return head
            if b"\r\n" not in self._buf:
                parse.check_request_line_start(self._buf)
            if len(self._buf) > parse.MAX_HEAD:
                raise HeadersTooLarge(
                    f"Request head longer than {parse.MAX_HEAD} bytes")
            if started is None and self._buf:
                started = self.request_started = time.monotonic()
            if started is not None:
                left = started + limit - time.monotonic()
                if left <= 0:
                    raise _head_timeout(limit)
                # Never 0: SO_RCVTIMEO takes a zero timeval as no timeout.
                self.set_timeout(min(idle, max(left, 0.01)))
            start = len(self._buf)
            try:
                chunk = self.sock.recv(HEAD_RECV_SIZE)
            except (TimeoutError, BlockingIOError) as e:
                if started is not None and (
                        time.monotonic() - started >= limit):
                    raise _head_timeout(limit) from e
                raise ConnectionGone(f"Receiving failed: {e}") from e
            except PEER_ERRORS as e:
                raise ConnectionGone(f"Receiving failed: {e}") from e
            if not chunk:
                if self._buf:
                    raise ConnectionGone("Peer closed in the middle of a head")
                return None
            self._buf += chunk

    def start_body(self, length: int, expect_continue: bool,
                   chunked: bool = False) -> None:
        self.body_left = length
        self.chunked = chunked
        self._chunk_left = 0
        self._chunked_done = not chunked
        self._continue_pending = expect_continue and (length > 0 or chunked)

    @property
    def body_done(self) -> bool:
        """True when the whole body was read: the next head may follow."""
        if self.chunked:
            return self._chunked_done
        return self.body_left == 0

    def readinto(self, buf: Writable) -> int:
        """Receive up to ``len(buf)`` bytes of the body into ``buf``.

        Raises ConnectionGone if the peer closes before the whole body
        came: a short body is never taken for a complete one. Returns 0
        at the end of the body.
        """
        if self.chunked:
            return self._readinto_chunked(buf)
        if self.body_left == 0:
            return 0
        self._send_continue()
        want = min(len(buf), self.body_left)
        if self._buf:
            n = min(want, len(self._buf))
            buf[:n] = self._buf[:n]
            del self._buf[:n]
            self.body_left -= n
            return n
        return self._receive_body(self.sock.recv_into, buf, want)

    def readinto_full(self, view: memoryview,
                      turn: Turn | None = None) -> int:
        """Fill ``view`` with body bytes; with a ``turn``, receive in turns
        (``_readinto_in_turns``).

        A TLS socket hands out one 16 KiB record per receive, so this loop
        runs 65,536 times per GiB: a plain body goes straight from the
        socket, with none of ``readinto``'s checks per record.
        """
        if len(view) > self.body_left:
            raise ValueError("Reading past the end of the body")
        if self.chunked or self._buf:
            got = 0
            while got < len(view):
                got += self.readinto(view[got:])
            return got
        self._send_continue()
        if turn is not None:
            return self._readinto_in_turns(view, turn)
        recv_into = self.sock.recv_into
        got, want = 0, len(view)
        try:
            while got < want and (n := recv_into(view[got:])):
                got += n
        except PEER_ERRORS as e:
            self.body_left -= got
            raise _receive_failed(e) from e
        self.body_left -= got
        if got < want:
            raise self._peer_closed()
        return got

    def _readinto_in_turns(self, view: memoryview, turn: Turn) -> int:
        """Fill ``view``: wait for the client outside any turn; when a
        whole TLS record (any byte, on a plain socket) came meanwhile,
        receive what is here (decrypting it) in a turn.

        Runs once per record when the client is the slower side, so it
        checks as little as it can (bench/results/20261208-turns.md).
        """
        whole = MAX_TLS_RECORD if self.tls else 1
        fd = self.sock.fileno()
        recv_into = self.sock.recv_into
        got, want = 0, len(view)
        while got < want:
            try:
                n = recv_into(view[got:])
            except PEER_ERRORS as e:
                raise _receive_failed(e) from e
            if not n:
                raise self._peer_closed()
            got += n
            self.body_left -= n
            if got < want and (queued := _queued(fd)) >= whole:
                with turn():
                    got += self._readinto_queued(
                        view[got:got + TLS_TURN_BYTES], queued, whole)
        return got

    def _readinto_queued(self, view: memoryview, queued: int,
                         whole: int) -> int:
        """Receive into ``view`` body bytes already here, never waiting for
        the client: while the socket holds ``whole`` bytes (a whole TLS
        record) of the ``queued`` it held."""
        fd = self.sock.fileno()
        recv_into = self.sock.recv_into
        got, want = 0, len(view)
        try:
            while got < want and queued >= whole:
                n = recv_into(view[got:])
                if not n:
                    break
                got += n
                # Count the most a record may add, so as never to wait.
                queued -= n + MAX_TLS_RECORD - 2**14
                if queued < whole:
                    queued = _queued(fd)
        except PEER_ERRORS as e:
            self.body_left -= got
            raise _receive_failed(e) from e
        self.body_left -= got
        return got

    def _receive_body(self, receive: Callable[..., int],
                      *args: object) -> int:
        """Call ``receive``, the socket to body step of readinto or splice."""
        n = self._receive(receive, *args)
        self.body_left -= n
        return n

    def _receive(self, receive: Callable[..., _Received],
                 *args: object) -> _Received:
        try:
            n = receive(*args)
        except PEER_ERRORS as e:
            raise _receive_failed(e) from e
        if not n:  # 0 from recv_into and splice, b"" from recv
            raise self._peer_closed()
        return n

    def _peer_closed(self) -> ConnectionGone:
        missing = "chunked body" if self.chunked else \
            f"{self.body_left} body bytes"
        return ConnectionGone(f"Peer closed with {missing} missing")

    # Chunked bodies

    def _readinto_chunked(self, buf: Writable) -> int:
        if self._chunked_done:
            return 0
        self._send_continue()
        if self._chunk_left == 0:
            size = parse.parse_chunk_size(self._read_line(parse.MAX_CHUNK_LINE))
            if size == 0:
                self._read_trailers()
                self._chunked_done = True
                return 0
            self._chunk_left = size
        want = min(len(buf), self._chunk_left)
        if self._buf:
            n = min(want, len(self._buf))
            buf[:n] = self._buf[:n]
            del self._buf[:n]
        else:
            n = self._receive(self.sock.recv_into, buf, want)
        self._chunk_left -= n
        if self._chunk_left == 0:
            self._read_crlf()
        return n

    def _read_crlf(self) -> None:
        """The CRLF after a chunk's data; a 400 as soon as a byte differs."""
        while len(self._buf) < 2 and self._buf[:1] in (b"", b"\r"):
            self._buf += self._receive(self.sock.recv, HEAD_RECV_SIZE)
        if self._buf[:2] != b"\r\n":
            raise BadRequest("Chunk data not followed by CRLF",
                             close_connection=True)
        del self._buf[:2]

    def _read_line(self, limit: int) -> bytes:
        """The next CRLF-terminated line of the body, without the CRLF;
        a 400 if ``limit`` bytes came without a line end."""
        start = 0
        while True:
            end = self._buf.find(b"\r\n", max(0, start - 1))
            if end != -1 and end <= limit:
                line = bytes(self._buf[:end])
                del self._buf[:end + 2]
                return line
            if end != -1 or len(self._buf) > limit + 1:
                raise BadRequest(f"Line in chunked body longer than {limit} "
                                 f"bytes", close_connection=True)
            start = len(self._buf)
            chunk = self._receive(self.sock.recv, HEAD_RECV_SIZE)
            self._buf += chunk

    def _read_trailers(self) -> None:
        """Read and drop the trailer section, bounded like a head."""
        for _ in range(parse.MAX_HEADERS + 1):
            if self._read_line(parse.MAX_HEADER_LINE) == b"":
                return
        raise HeadersTooLarge(f"More than {parse.MAX_HEADERS} trailer lines")

    def splice_body(self, fd: int, offset: int, count: int, pipe: Pipe,
                    turn: Turn = nullcontext) -> int:
        """Move ``count`` body bytes to file ``fd`` at ``offset`` in the kernel.

        socket -> pipe -> file with ``os.splice``: the bytes are never
        copied to user space. ``pipe`` is a ``diskferry.pipe.Pipe``. Each
        step waits for the client with no ``turn`` held, then, in its
        ``turn`` (``diskferry.daemon.turns``), adds what came while it
        waited for the turn and writes the pipe out.
        """
        self._send_continue()
        done = 0
        if self._buf:
            head = self._take_buffered(count)
            pwrite_all(fd, head, offset)
            done = len(head)
        r, w = _open_end(pipe.r), _open_end(pipe.w)
        sockfd = self.sock.fileno()
        while done < count:
            want = min(pipe.size, count - done)
            n = self._receive_body(os.splice, sockfd, w, want)
            with turn() as waited:
                if waited:
                    n += self._splice_queued(sockfd, w, want - n)
                left = n
                while left:
                    left -= os.splice(r, fd, left,
                                      offset_dst=offset + done + n - left)
            done += n
        return done

    def _splice_queued(self, sockfd: int, w: int, limit: int) -> int:
        """Move up to ``limit`` bytes the socket holds into the pipe,
        without waiting for the client (or for room in the pipe)."""
        queued = _queued(sockfd)
        if min(queued, limit) <= 0:
            return 0
        try:
            n = os.splice(sockfd, w, min(queued, limit),
                          flags=os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            return 0  # the pipe is full
        except PEER_ERRORS as e:
            raise _receive_failed(e) from e
        self.body_left -= n
        return n

    def splice_body_to_pipe(self, pipe: Pipe, count: int) -> int:
        """Move the next ``count`` body bytes into ``pipe`` (at most its
        capacity), for a consumer that splices them on (an NBD WRITE)."""
        self._send_continue()
        w = _open_end(pipe.w)
        done = 0
        if self._buf:
            head = self._take_buffered(count)
            _write_all(w, head)
            done = len(head)
        sockfd = self.sock.fileno()
        while done < count:
            done += self._receive_body(os.splice, sockfd, w, count - done)
        return done

    def _take_buffered(self, count: int) -> bytes:
        """Up to ``count`` body bytes that came with the head, consumed:
        they count as read before the caller writes them anywhere, so that
        a failed write leaves ``body_left`` true and the drain after it
        waits for no byte already received."""
        data = bytes(self._buf[:count])
        del self._buf[:len(data)]
        self.body_left -= len(data)
        return data

    def read_body(self, limit: int) -> bytes:
        """The whole body as bytes, for small (JSON) bodies."""
        if self.body_left > limit:
            raise BadRequest(f"Body larger than {limit} bytes")
        data = bytearray(self.body_left)
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            pos += self.readinto(view[pos:])
        return bytes(data)

    def discard_body(self, limit: int) -> bool:
        """Read and drop an unread body of at most ``limit`` bytes.

        Keeps the connection in sync after a request was refused. Returns
        False, reading nothing, when the body is declared larger or the
        client still waits for 100 Continue (it may never send the body);
        False too once a chunked body passed ``limit``.
        """
        if self.body_done:
            return True
        if self._continue_pending or (
                not self.chunked and self.body_left > limit):
            return False
        scratch = memoryview(bytearray(DISCARD_SCRATCH))
        drained = 0
        while n := self.readinto(scratch):
            drained += n
            if drained > limit:
                return False
        return True

    def _send_continue(self) -> None:
        if self._continue_pending:
            self._continue_pending = False
            self._sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    # Writing

    def send_response(self, status: int, body: bytes | str = b"",
                      content_type: str = "text/plain",
                      headers: dict[str, str] | None = None) -> None:
        """Send a whole response with a small body."""
        if isinstance(body, str):
            body = body.encode("utf-8")
        if body or status >= 400:
            headers = {"Content-Type": content_type, **(headers or {})}
        # One send for head and body: one packet, one TLS record.
        self.start_response(status, len(body), headers, body)

    def start_response(self, status: int, content_length: int,
                       headers: dict[str, str] | None = None,
                       body: bytes = b"") -> None:
        """Send the status line and headers, and ``body`` if given; the
        rest of the body follows with write() or sendfile().

        The answer to a HEAD request (``no_body``) is the head alone.
        """
        self.status = status
        if self.no_body:
            self.send_head(status, content_length, headers)
            return
        hold = self.tls and not body and 0 < content_length <= HELD_HEAD_BODY
        self._send_head(status, content_length, headers, body, hold)
        self._response_left = content_length - len(body)

    def send_head(self, status: int, content_length: int,
                  headers: dict[str, str] | None = None) -> None:
        """Answer a HEAD request: the head GET would send, no body."""
        self._send_head(status, content_length, headers)
        self._response_left = 0

    def _send_head(self, status: int, content_length: int,
                   headers: dict[str, str] | None, body: bytes = b"",
                   hold: bool = False) -> None:
        if self.response_started:
            raise RuntimeError("Response already started")
        self.response_started = True
        reason = HTTPStatus(status).phrase
        lines = [f"HTTP/1.1 {status} {reason}"]
        fields = {**self.extra_headers, **(headers or {})}
        if self.close_after:
            fields["Connection"] = "close"
        for name, value in fields.items():
            lines.append(f"{name}: {value}")
        lines.append(f"Content-Length: {content_length}")
        lines.append("\r\n")
        head = "\r\n".join(lines).encode("latin-1")
        if hold:
            self._held_head = head
        else:
            self._sendall(head + body)

    def write(self, data: Readable) -> None:
        self._response_left -= len(data)
        if self._held_head:
            data, self._held_head = self._held_head + data, b""
        self._sendall(data)

    def sendfile(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of file ``fd`` from ``offset`` in the kernel."""
        self._send_held_head()
        sockfd = self.sock.fileno()
        while count:
            try:
                n = os.sendfile(sockfd, fd, offset, count)
            except PEER_ERRORS as e:
                raise ConnectionGone(f"Sending failed: {e}") from e
            if n == 0:
                raise OSError(f"Unexpected end of file at offset {offset}")
            offset += n
            count -= n
            self._response_left -= n

    def send_pipe(self, pipe: Pipe, count: int) -> None:
        """Send ``count`` bytes the read end of ``pipe`` holds, in the
        kernel (a pipe filled from another socket: an NBD reply)."""
        self._send_held_head()
        r = _open_end(pipe.r)
        sockfd = self.sock.fileno()
        while count:
            try:
                n = os.splice(r, sockfd, count)
            except PEER_ERRORS as e:
                raise ConnectionGone(f"Sending failed: {e}") from e
            if n == 0:
                raise ServerError(f"The image's data ended {count} bytes "
                                  f"early")
            count -= n
            self._response_left -= n

    def _send_held_head(self) -> None:
        if self._held_head:
            head, self._held_head = self._held_head, b""
            self._sendall(head)

    @property
    def response_complete(self) -> bool:
        return self.response_started and self._response_left == 0

    def _sendall(self, data: Readable) -> None:
        try:
            self.sock.sendall(data)
        except PEER_ERRORS as e:
            raise ConnectionGone(f"Sending failed: {e}") from e

    @property
    def zero_copy(self) -> bool:
        """True when sendfile() can be used (plain TCP and UNIX sockets)."""
        return not self.tls

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _head_timeout(limit: float) -> RequestTimeout:
    return RequestTimeout(
        f"Request head not received within {limit:g} seconds")


def _queued(fd: int) -> int:
    """Bytes the socket ``fd`` has received that nobody read yet."""
    count: int = struct.unpack(
        "i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    return count


def _receive_failed(error: Exception) -> ConnectionGone:
    return ConnectionGone(f"Receiving body failed: {error}")


def _open_end(fd: int | None) -> int:
    """One end of a pipe, which must still be open."""
    if fd is None:
        raise ValueError("Splicing through a closed pipe end")
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
