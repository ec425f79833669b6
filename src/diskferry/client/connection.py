"""One keep-alive connection to one image: the images API as methods.

This is where the bytes move, so the data path avoids per-byte Python
work and extra copies:

- GET on TCP or a UNIX socket: the body goes socket -> pipe -> file with
  ``splice`` (see ``splice.py``). On TLS it is read with ``readinto``
  into one reused buffer per connection and written with ``os.pwrite``.
- PUT on TCP or a UNIX socket: the request head goes through
  ``http.client``, the body straight from the source file to the socket
  with ``os.sendfile`` (no copy through Python). On TLS the kernel cannot
  encrypt, so the body is ``preadv`` into the buffer and ``sendall``.

Every transport failure becomes ``ConnectionFailed`` and closes the
connection (the next request reconnects); an error status becomes
``HTTPError`` and the connection goes on when the server keeps it.
"""

import errno
import http.client
import json
import os
import select
import ssl
import urllib.parse

from diskferry.client import splice
from diskferry.client.errors import (
    ConnectionFailed,
    HTTPError,
    ProtocolError,
)
from diskferry.fileio import pwrite_all
from diskferry.pipe import Pipe

#: Default size of the reused I/O buffer, and of the largest request.
BUFFER_SIZE = 8 * 1024**2

#: Bytes of a GET body received before they are handed on (written,
#: scanned for zeros): small enough to still be in the CPU's cache when
#: they are, where a whole 8 MiB request would not. A 4 GiB qcow2 with
#: 1 GiB of data downloaded over the UNIX socket: 0.581 s against 0.599
#: s; over TLS 2-3% less client CPU (bench/results/
#: 20261206-stream-chunks.md); 256 KiB was no better.
STREAM_CHUNK = 1024**2

#: Error bodies are short messages; never read more of one than this.
MAX_ERROR_BODY = 64 * 1024

#: JSON answers (options, extents of a huge image) are bounded too.
MAX_JSON_BODY = 256 * 1024**2

#: Largest single sendfile() call; the kernel caps it near 2 GiB anyway.
MAX_SENDFILE = 1024**3


class ImageConnection:
    """Requests to ``/images/{ticket}`` over one connection of a transport.

    Not thread-safe: each worker of a copy uses its own.
    """

    def __init__(self, transport, path, buffer_size=BUFFER_SIZE):
        self.transport = transport
        self.path = path
        self.buffer_size = buffer_size
        self._con = None
        self._buf = None
        self._pipe = None

    # -- connection management

    def close(self):
        if self._con is not None:
            self._con.close()
            self._con = None
        if self._pipe is not None:
            # Bytes may be left in it after a failure; start clean.
            self._pipe.close()
            self._pipe = None

    def reusable(self):
        """False when the server closed the kept-alive connection (its idle
        timeout) or sent bytes nobody asked for: a request sent on it
        would fail. A closed connection is reusable: it reconnects."""
        if self._con is None or self._con.sock is None:
            return True
        poller = select.poll()
        poller.register(self._con.sock.fileno(), select.POLLIN)
        return not poller.poll(0)

    def peer_address(self):
        """The IP address of the connected server (None on a UNIX socket)."""
        if self._con is None or self._con.sock is None:
            return None
        peer = self._con.sock.getpeername()
        return peer[0] if isinstance(peer, tuple) else None

    def _connection(self):
        if self._con is None or self._con.sock is None:
            self.close()
            try:
                self._con = self.transport.connection()
            except OSError as e:
                raise ConnectionFailed(
                    f"cannot connect to {self.transport.describe()}: {e}"
                ) from e
        return self._con

    def _buffer(self):
        if self._buf is None:
            self._buf = memoryview(bytearray(self.buffer_size))
        return self._buf

    def _failed(self, what, error):
        self.close()
        return ConnectionFailed(
            f"{what} on {self.transport.describe()}: "
            f"{error.__class__.__name__}: {error}")

    def _response(self, method, target, expected):
        """Read the response head; raise HTTPError unless status expected."""
        res = self._con.getresponse()
        if res.status not in expected:
            body = res.read(MAX_ERROR_BODY)
            if res.will_close or not res.isclosed():
                self.close()
            message = body.decode("utf-8", "replace").strip()
            raise HTTPError(method, target, res.status, res.reason, message)
        return res

    def _refused_early(self, method, target):
        """Raise the server's answer if it refused a request before
        reading its body (403, 416) and closed: it says why, where the
        broken pipe does not. Returns if there is no answer to read."""
        try:
            self._response(method, target, ())
        except (OSError, http.client.HTTPException):
            return

    def _simple(self, method, target, body=None, headers=None,
                expected=(200,)):
        """Send a small request; return (response, body bytes)."""
        con = self._connection()
        try:
            con.request(method, target, body=body, headers=headers or {})
            res = self._response(method, target, expected)
            data = res.read(MAX_JSON_BODY + 1)
        except (OSError, http.client.HTTPException) as e:
            raise self._failed(f"{method} {target}", e) from e
        if len(data) > MAX_JSON_BODY:
            self.close()
            raise ProtocolError(f"{method} {target}: answer too large")
        if res.will_close:
            self.close()
        return res, data

    def _json(self, method, target, body=None, expected=(200,)):
        headers = {}
        if body is not None:
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        res, data = self._simple(method, target, body, headers, expected)
        if not data:
            return res, None
        try:
            return res, json.loads(data)
        except ValueError as e:
            raise ProtocolError(
                f"{method} {target}: invalid JSON answer: {e}") from None

    # -- images API

    def options(self):
        """Return (allowed methods, options dict) or None on old servers.

        Old servers answer OPTIONS with 405 or a 204 without a body; they
        can only GET and PUT.
        """
        res, data = self._json("OPTIONS", self.path, expected=(200, 204, 405))
        if res.status != 200 or not isinstance(data, dict):
            return None
        allow = {m.strip().upper()
                 for m in (res.getheader("Allow") or "").split(",")
                 if m.strip()}
        return allow, data

    def extents(self, context="zero", start=None, length=None):
        params = {"context": context}
        if start is not None:
            params.update(start=start, length=length)
        query = urllib.parse.urlencode(params)
        _, data = self._json("GET", f"{self.path}/extents?{query}")
        if not isinstance(data, list):
            raise ProtocolError("extents answer is not a list")
        return data

    def checksum(self, algorithm=None, block_size=None):
        params = {}
        if algorithm:
            params["algorithm"] = algorithm
        if block_size:
            params["block_size"] = block_size
        target = f"{self.path}/checksum"
        if params:
            target += "?" + urllib.parse.urlencode(params)
        _, data = self._json("GET", target)
        return data

    def zero(self, offset, length, flush=False):
        self._json("PATCH", self.path, {
            "op": "zero", "offset": offset, "size": length, "flush": flush})

    def flush(self):
        self._json("PATCH", self.path, {"op": "flush"})

    def probe_size(self):
        """Image size from ``Content-Range`` of a one-byte GET (any server)."""
        res, _ = self._simple("GET", self.path, headers={"Range": "bytes=0-0"},
                              expected=(206, 416))
        content_range = res.getheader("Content-Range") or ""
        try:
            return int(content_range.rsplit("/", 1)[1])
        except (IndexError, ValueError):
            raise ProtocolError(
                f"GET {self.path}: bad Content-Range {content_range!r}"
            ) from None

    # -- data path

    def _start_get(self, offset, length):
        con = self._connection()
        con.putrequest("GET", self.path, skip_accept_encoding=True)
        con.putheader("Range", f"bytes={offset}-{offset + length - 1}")
        con.endheaders()
        res = self._response("GET", self.path, (206,))
        if res.length != length:
            self.close()
            raise ProtocolError(
                f"GET {self.path} bytes {offset}-{offset + length - 1}: "
                f"server sent {res.length} bytes instead of {length}")
        return res

    def readinto(self, buf, offset):
        """Read ``len(buf)`` bytes at ``offset`` into ``buf``."""
        view = memoryview(buf).cast("B")
        got = 0
        try:
            res = self._start_get(offset, len(view))
            while got < len(view):
                n = res.readinto(view[got:])
                if not n:
                    raise ConnectionFailed("body ended early")
                got += n
        except (OSError, http.client.HTTPException, ConnectionFailed) as e:
            raise self._failed(f"GET at offset {offset + got}", e) from e
        return got

    def read_to_fd(self, fd, offset, length, ack, positional=True,
                   fd_offset=None):
        """Copy ``length`` bytes at ``offset`` to ``fd`` at ``fd_offset``
        (default: the same offset).

        ``ack(n)`` is called after each ``n`` bytes are written, so that a
        caller can resume after a failure from the last byte written.
        ``positional=False`` for a destination without offsets (a pipe,
        /dev/null).
        """
        if fd_offset is None:
            fd_offset = offset
        if splice.AVAILABLE and not self.transport.encrypted:
            self._splice_to_fd(fd, offset, length, ack, positional, fd_offset)
            return

        def write(view, pos):
            if positional:
                pwrite_all(fd, view, pos - offset + fd_offset)
            else:
                rest = view
                while rest:
                    rest = rest[os.write(fd, rest):]
            ack(len(view))
        self.read_chunks(offset, length, write)

    def read_chunks(self, offset, length, consume):
        """GET ``length`` bytes at ``offset`` as one request, handing them
        to ``consume(view, offset)`` in order, ``STREAM_CHUNK`` bytes at a
        time; a view is valid only during its call.

        A failure of ``consume`` propagates as it is and closes the
        connection, whose response is then unread.
        """
        view = self._buffer()[:STREAM_CHUNK]
        pos = offset
        end = offset + length
        try:
            res = self._start_get(offset, length)
            readinto = res.readinto
            while pos < end:
                n = readinto(view[:min(end - pos, len(view))])
                if not n:
                    raise ConnectionFailed("body ended early")
                consume(view[:n], pos)
                pos += n
        except (OSError, http.client.HTTPException, ConnectionFailed) as e:
            if isinstance(e, OSError) and not _is_network_error(e):
                self.close()
                raise
            raise self._failed(f"GET at offset {pos}", e) from e
        except BaseException:
            self.close()
            raise

    def _splice_to_fd(self, fd, offset, length, ack, positional, fd_offset):
        pos = offset

        def acked(n):
            nonlocal pos
            pos += n
            ack(n)

        try:
            con = self._connection()
            if self._pipe is None:
                self._pipe = Pipe()
            keep = splice.get_to_fd(con.sock, self.transport.host_header(),
                                    self._pipe, self.path, fd, offset,
                                    length, acked, positional, fd_offset)
        except (HTTPError, ProtocolError):
            self.close()
            raise
        except (OSError, ConnectionFailed) as e:
            if splice.is_local_error(e) or (
                    isinstance(e, OSError) and not _is_network_error(e)):
                self.close()
                raise
            raise self._failed(f"GET at offset {pos}", e) from e
        if not keep:
            self.close()

    def write(self, data, offset, flush=True):
        """PUT ``data`` (bytes-like) at ``offset``."""
        view = memoryview(data).cast("B")
        self._put(offset, len(view), flush, lambda sock: sock.sendall(view))

    def write_from_fd(self, fd, offset, length, flush=True, src_offset=None):
        """PUT ``length`` bytes of file ``fd`` (at ``src_offset``, default
        ``offset``) to the image at ``offset``."""
        if src_offset is None:
            src_offset = offset
        self.write_from_files([(fd, src_offset, length)], offset, flush)

    def write_from_files(self, parts, offset, flush=True):
        """PUT file ranges ``parts`` (``(fd, file offset, length)`` each),
        one after the other, to the image at ``offset``: one request, the
        kernel moving the bytes (through a buffer under TLS)."""
        length = sum(n for _, _, n in parts)
        if self.transport.encrypted:
            def send(sock):
                buf = self._buffer()
                for fd, src_offset, n in parts:
                    _send_copied(sock, fd, src_offset, n, buf)
        else:
            def send(sock):
                for fd, src_offset, n in parts:
                    _sendfile(sock, fd, src_offset, n)
        self._put(offset, length, flush, send)

    def _put(self, offset, length, flush, send_body):
        target = self.path if flush else f"{self.path}?flush=n"
        try:
            con = self._connection()
            con.putrequest("PUT", target, skip_accept_encoding=True)
            con.putheader("Content-Length", str(length))
            con.putheader("Content-Range",
                          f"bytes {offset}-{offset + length - 1}/*")
            con.endheaders()
            try:
                send_body(con.sock)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError):
                # Closed by the server, not timed out: it may have answered.
                self._refused_early("PUT", target)
                raise
            res = self._response("PUT", target, (200, 204))
            res.read(MAX_ERROR_BODY)
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, OSError) and not _is_network_error(e):
                raise
            raise self._failed(f"PUT at offset {offset}", e) from e
        if res.will_close:
            self.close()


class SourceError(OSError):
    """Raised when the local source file ended or failed mid-request."""


def _is_network_error(error):
    """Tell socket failures from local file failures (both OSError)."""
    return not isinstance(error, SourceError) and (
        isinstance(error, ConnectionError | TimeoutError | ssl.SSLError)
        or error.errno is None
        or error.errno in _NETWORK_ERRNOS)


_NETWORK_ERRNOS = {
    errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE,
    errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH,
    errno.ENETDOWN, errno.ESHUTDOWN,
}


def _wait_writable(sock):
    timeout = sock.gettimeout()
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    if not poller.poll(None if timeout is None else timeout * 1000):
        raise TimeoutError("timed out sending the request body")


def _sendfile(sock, fd, offset, count):
    """Send ``count`` bytes of ``fd`` at ``offset``: zero-copy."""
    sock_fd = sock.fileno()
    while count:
        try:
            sent = os.sendfile(sock_fd, fd, offset, min(count, MAX_SENDFILE))
        except BlockingIOError:
            _wait_writable(sock)
            continue
        if not sent:
            raise SourceError(f"source ended at offset {offset}")
        offset += sent
        count -= sent


def _send_copied(sock, fd, offset, count, view):
    """Send ``count`` bytes of ``fd`` at ``offset`` through a buffer (TLS)."""
    while count:
        chunk = view[:min(count, len(view))]
        n = os.preadv(fd, [chunk], offset)
        if not n:
            raise SourceError(f"source ended at offset {offset}")
        sock.sendall(chunk[:n])
        offset += n
        count -= n
