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
                   connection: from its start) to the end of the head;
                   past it the request is answered 408 and the
                   connection closed, however often bytes trickle in

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

import os
import socket
import ssl
import struct
import time
from http import HTTPStatus

from diskferry.daemon.http import parse
from diskferry.errors import (
    BadRequest,
    ConnectionGone,
    HeadersTooLarge,
    RequestTimeout,
    ServerError,
)
from diskferry.fileio import pwrite_all

#: Bytes asked of recv() when reading a head; also bounds how much of a
#: body can land in the head buffer.
HEAD_RECV_SIZE = 64 * 1024

#: Errors of a socket operation meaning the peer is gone or timed out
#: (EAGAIN is how a kernel socket timeout shows on a blocking socket).
PEER_ERRORS = (ConnectionError, TimeoutError, BlockingIOError, ssl.SSLError)

#: Seconds a peer has to send a whole request head once it started one.
#: A client sends its head in one packet, so this bounds only peers that
#: trickle bytes to hold a thread (slowloris), which the idle timeout
#: alone never cuts: each byte restarts it. nginx allows 60 s
#: (client_header_timeout), Apache 20-40 s (mod_reqtimeout);
#: ovirt-imageio has no such bound.
HEAD_TIMEOUT = 30.0


class Connection:
    """A client connection, used by one thread at a time."""

    def __init__(self, sock, *, tls=False, timeout=60.0,
                 head_timeout=HEAD_TIMEOUT):
        self.sock = sock
        self.tls = tls
        self.head_timeout = head_timeout
        # The first head's deadline runs from the connection's start.
        self._head_started = time.monotonic()
        self._buf = bytearray()
        self.body_left = 0
        self.chunked = False
        self._chunk_left = 0
        self._chunked_done = True
        self._continue_pending = False
        self.extra_headers = {}
        self.close_after = False
        self.no_body = False
        self._response_left = 0
        self.response_started = False
        self.closed = False
        self.timeout = None
        self.set_timeout(timeout)

    # Timeouts

    def set_timeout(self, seconds):
        """Bound every blocking receive and send on this connection."""
        if seconds == self.timeout:
            return
        self.timeout = seconds
        if self.tls:
            self.sock.settimeout(seconds)
            return
        sec = int(seconds)
        usec = int((seconds - sec) * 1e6)
        tv = struct.pack("ll", sec, usec)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)

    # Reading

    def read_head(self):
        """Read the next request head; None if the peer closed cleanly.

        Enforces the head limits while reading, so that a peer cannot make
        the server buffer more than ``parse.MAX_HEAD`` bytes, nor take
        longer than ``head_timeout`` seconds to send it.
        """
        self.response_started = False
        self.extra_headers = {}
        self.close_after = False
        self.no_body = False
        idle = self.timeout
        started, self._head_started = self._head_started, None
        try:
            return self._read_head(idle, started)
        finally:
            self.set_timeout(idle)

    def _read_head(self, idle, started):
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
                started = time.monotonic()
            if started is not None:
                left = started + self.head_timeout - time.monotonic()
                if left <= 0:
                    raise RequestTimeout(
                        f"Request head not received within "
                        f"{self.head_timeout:g} seconds")
                # Never 0: SO_RCVTIMEO takes a zero timeval as no timeout.
                self.set_timeout(min(idle, max(left, 0.01)))
            start = len(self._buf)
            try:
                chunk = self.sock.recv(HEAD_RECV_SIZE)
            except (TimeoutError, BlockingIOError) as e:
                if started is not None and (
                        time.monotonic() - started >= self.head_timeout):
                    raise RequestTimeout(
                        f"Request head not received within "
                        f"{self.head_timeout:g} seconds") from e
                raise ConnectionGone(f"Receiving failed: {e}") from e
            except PEER_ERRORS as e:
                raise ConnectionGone(f"Receiving failed: {e}") from e
            if not chunk:
                if self._buf:
                    raise ConnectionGone("Peer closed in the middle of a head")
                return None
            self._buf += chunk

    def start_body(self, length, expect_continue, chunked=False):
        self.body_left = length
        self.chunked = chunked
        self._chunk_left = 0
        self._chunked_done = not chunked
        self._continue_pending = expect_continue and (length > 0 or chunked)

    @property
    def body_done(self):
        """True when the whole body was read: the next head may follow."""
        if self.chunked:
            return self._chunked_done
        return self.body_left == 0

    def readinto(self, buf):
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

    def readinto_full(self, view):
        """Fill ``view`` with body bytes.

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

    def _receive_body(self, receive, *args):
        """Call ``receive``, the socket to body step of readinto or splice."""
        n = self._receive(receive, *args)
        self.body_left -= n
        return n

    def _receive(self, receive, *args):
        try:
            n = receive(*args)
        except PEER_ERRORS as e:
            raise _receive_failed(e) from e
        if not n:  # 0 from recv_into and splice, b"" from recv
            raise self._peer_closed()
        return n

    def _peer_closed(self):
        missing = "chunked body" if self.chunked else \
            f"{self.body_left} body bytes"
        return ConnectionGone(f"Peer closed with {missing} missing")

    # Chunked bodies

    def _readinto_chunked(self, buf):
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

    def _read_crlf(self):
        """The CRLF after a chunk's data; a 400 as soon as a byte differs."""
        while len(self._buf) < 2 and self._buf[:1] in (b"", b"\r"):
            self._buf += self._receive(self.sock.recv, HEAD_RECV_SIZE)
        if self._buf[:2] != b"\r\n":
            raise BadRequest("Chunk data not followed by CRLF",
                             close_connection=True)
        del self._buf[:2]

    def _read_line(self, limit):
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

    def _read_trailers(self):
        """Read and drop the trailer section, bounded like a head."""
        for _ in range(parse.MAX_HEADERS + 1):
            if self._read_line(parse.MAX_HEADER_LINE) == b"":
                return
        raise HeadersTooLarge(f"More than {parse.MAX_HEADERS} trailer lines")

    def splice_body(self, fd, offset, count, pipe):
        """Move ``count`` body bytes to file ``fd`` at ``offset`` in the kernel.

        socket -> pipe -> file with ``os.splice``: the bytes are never
        copied to user space. ``pipe`` is a ``diskferry.pipe.Pipe``.
        """
        self._send_continue()
        done = 0
        if self._buf:
            head = bytes(self._buf[:count])
            del self._buf[:len(head)]
            pwrite_all(fd, head, offset)
            done = len(head)
            self.body_left -= done
        sockfd = self.sock.fileno()
        while done < count:
            n = self._receive_body(os.splice, sockfd, pipe.w,
                                   min(pipe.size, count - done))
            left = n
            while left:
                left -= os.splice(pipe.r, fd, left,
                                  offset_dst=offset + done + n - left)
            done += n
        return done

    def splice_body_to_pipe(self, pipe, count):
        """Move the next ``count`` body bytes into ``pipe`` (at most its
        capacity), for a consumer that splices them on (an NBD WRITE)."""
        self._send_continue()
        done = 0
        if self._buf:
            head = bytes(self._buf[:count])
            del self._buf[:len(head)]
            _write_all(pipe.w, head)
            done = len(head)
            self.body_left -= done
        sockfd = self.sock.fileno()
        while done < count:
            done += self._receive_body(os.splice, sockfd, pipe.w, count - done)
        return done

    def read_body(self, limit):
        """The whole body as bytes, for small (JSON) bodies."""
        if self.body_left > limit:
            raise BadRequest(f"Body larger than {limit} bytes")
        data = bytearray(self.body_left)
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            pos += self.readinto(view[pos:])
        return bytes(data)

    def discard_body(self, limit):
        """Read and drop an unread body of at most ``limit`` bytes.

        Keeps the connection in sync after a request was refused. Returns
        False, reading nothing, when the body is larger or the client
        still waits for 100 Continue (it may never send the body).
        """
        if self.body_done:
            return True
        if self.chunked or self.body_left > limit or self._continue_pending:
            return False
        scratch = memoryview(bytearray(min(self.body_left, 65536)))
        while self.body_left:
            self.readinto(scratch)
        return True

    def _send_continue(self):
        if self._continue_pending:
            self._continue_pending = False
            self._sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    # Writing

    def send_response(self, status, body=b"", content_type="text/plain",
                      headers=None):
        """Send a whole response with a small body."""
        if isinstance(body, str):
            body = body.encode("utf-8")
        if body or status >= 400:
            headers = {"Content-Type": content_type, **(headers or {})}
        # One send for head and body: one packet, one TLS record.
        self.start_response(status, len(body), headers, body)

    def start_response(self, status, content_length, headers=None, body=b""):
        """Send the status line and headers, and ``body`` if given; the
        rest of the body follows with write() or sendfile().

        The answer to a HEAD request (``no_body``) is the head alone.
        """
        if self.no_body:
            self.send_head(status, content_length, headers)
            return
        self._send_head(status, content_length, headers, body)
        self._response_left = content_length - len(body)

    def send_head(self, status, content_length, headers=None):
        """Answer a HEAD request: the head GET would send, no body."""
        self._send_head(status, content_length, headers)
        self._response_left = 0

    def _send_head(self, status, content_length, headers, body=b""):
        if self.response_started:
            raise RuntimeError("Response already started")
        self.response_started = True
        reason = HTTPStatus(status).phrase
        lines = [f"HTTP/1.1 {status} {reason}"]
        headers = {**self.extra_headers, **(headers or {})}
        if self.close_after:
            headers["Connection"] = "close"
        for name, value in headers.items():
            lines.append(f"{name}: {value}")
        lines.append(f"Content-Length: {content_length}")
        lines.append("\r\n")
        self._sendall("\r\n".join(lines).encode("latin-1") + body)

    def write(self, data):
        self._response_left -= len(data)
        self._sendall(data)

    def sendfile(self, fd, offset, count):
        """Send ``count`` bytes of file ``fd`` from ``offset`` in the kernel."""
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

    def send_pipe(self, pipe, count):
        """Send ``count`` bytes the read end of ``pipe`` holds, in the
        kernel (a pipe filled from another socket: an NBD reply)."""
        sockfd = self.sock.fileno()
        while count:
            try:
                n = os.splice(pipe.r, sockfd, count)
            except PEER_ERRORS as e:
                raise ConnectionGone(f"Sending failed: {e}") from e
            if n == 0:
                raise ServerError(f"The image's data ended {count} bytes "
                                  f"early")
            count -= n
            self._response_left -= n

    @property
    def response_complete(self):
        return self.response_started and self._response_left == 0

    def _sendall(self, data):
        try:
            self.sock.sendall(data)
        except PEER_ERRORS as e:
            raise ConnectionGone(f"Sending failed: {e}") from e

    @property
    def zero_copy(self):
        """True when sendfile() can be used (plain TCP and UNIX sockets)."""
        return not self.tls

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _receive_failed(error):
    return ConnectionGone(f"Receiving body failed: {error}")


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
