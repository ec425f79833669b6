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

from __future__ import annotations

import errno
import http.client
import json
import os
import select
import socket
import ssl
import urllib.parse
from collections.abc import Callable, Collection, Iterator, Mapping
from types import TracebackType
from typing import Any

from diskferry.client import splice
from diskferry.client.errors import (
    ConnectionFailed,
    HTTPError,
    ProtocolError,
)
from diskferry.client.transport import Transport
from diskferry.fileio import pwrite_all
from diskferry.pipe import Pipe

#: A file range a PUT sends: ``(fd, file offset, length)``.
FilePart = tuple[int, int, int]

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

    def __init__(self, transport: Transport, path: str,
                 buffer_size: int = BUFFER_SIZE) -> None:
        self.transport = transport
        self.path = path
        self.buffer_size = buffer_size
        self._con: http.client.HTTPConnection | None = None
        self._buf: memoryview | None = None
        self._pipe: Pipe | None = None

    # -- connection management

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        if self._pipe is not None:
            # Bytes may be left in it after a failure; start clean.
            self._pipe.close()
            self._pipe = None

    def reusable(self) -> bool:
        """False when the server closed the kept-alive connection (its idle
        timeout) or sent bytes nobody asked for: a request sent on it
        would fail. A closed connection is reusable: it reconnects."""
        if self._con is None or self._con.sock is None:
            return True
        poller = select.poll()
        poller.register(self._con.sock.fileno(), select.POLLIN)
        return not poller.poll(0)

    def peer_address(self) -> str | None:
        """The IP address of the connected server (None on a UNIX socket)."""
        if self._con is None or self._con.sock is None:
            return None
        peer = self._con.sock.getpeername()
        return str(peer[0]) if isinstance(peer, tuple) else None

    def _connection(self) -> http.client.HTTPConnection:
        if self._con is None or self._con.sock is None:
            self.close()
            try:
                self._con = self.transport.connection()
            except OSError as e:
                raise ConnectionFailed(
                    f"cannot connect to {self.transport.describe()}: {e}"
                ) from e
        return self._con

    def _buffer(self) -> memoryview:
        if self._buf is None:
            self._buf = memoryview(bytearray(self.buffer_size))
        return self._buf

    def _failed(self, what: str, error: BaseException) -> ConnectionFailed:
        self.close()
        return ConnectionFailed(
            f"{what} on {self.transport.describe()}: "
            f"{error.__class__.__name__}: {error}")

    def _response(self, method: str, target: str,
                  expected: Collection[int]) -> http.client.HTTPResponse:
        """Read the response head; raise HTTPError unless status expected."""
        res = self._connection().getresponse()
        if res.status not in expected:
            body = res.read(MAX_ERROR_BODY)
            if res.will_close or not res.isclosed():
                self.close()
            message = body.decode("utf-8", "replace").strip()
            raise HTTPError(method, target, res.status, res.reason, message)
        return res

    def _refused_early(self, method: str, target: str) -> None:
        """Raise the server's answer if it refused a request before
        reading its body (403, 416) and closed: it says why, where the
        broken pipe does not. Returns if there is no answer to read."""
        try:
            self._response(method, target, ())
        except (OSError, http.client.HTTPException):
            return

    def _simple(self, method: str, target: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None,
                expected: Collection[int] = (200,)
                ) -> tuple[http.client.HTTPResponse, bytes]:
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

    def _json(self, method: str, target: str, body: object = None,
              expected: Collection[int] = (200,)
              ) -> tuple[http.client.HTTPResponse, Any]:
        headers = {}
        encoded = None
        if body is not None:
            encoded = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        res, data = self._simple(method, target, encoded, headers, expected)
        if not data:
            return res, None
        try:
            return res, json.loads(data)
        except ValueError as e:
            raise ProtocolError(
                f"{method} {target}: invalid JSON answer: {e}") from None

    # -- images API

    def options(self) -> tuple[set[str], dict[str, Any]] | None:
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

    def extents(self, context: str = "zero", start: int | None = None,
                length: int | None = None) -> list[Any]:
        params: dict[str, object] = {"context": context}
        if start is not None:
            params.update(start=start, length=length)
        query = urllib.parse.urlencode(params)
        _, data = self._json("GET", f"{self.path}/extents?{query}")
        if not isinstance(data, list):
            raise ProtocolError("extents answer is not a list")
        return data

    def checksum(self, algorithm: str | None = None,
                 block_size: int | None = None) -> dict[str, Any]:
        params: dict[str, object] = {}
        if algorithm:
            params["algorithm"] = algorithm
        if block_size:
            params["block_size"] = block_size
        target = f"{self.path}/checksum"
        if params:
            target += "?" + urllib.parse.urlencode(params)
        _, data = self._json("GET", target)
        if not isinstance(data, dict):
            raise ProtocolError("checksum answer is not an object")
        return data

    def zero(self, offset: int, length: int, flush: bool = False) -> None:
        self._json("PATCH", self.path, {
            "op": "zero", "offset": offset, "size": length, "flush": flush})

    def flush(self) -> None:
        self._json("PATCH", self.path, {"op": "flush"})

    def probe_size(self) -> int:
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

    def _start_get(self, offset: int,
                   length: int) -> http.client.HTTPResponse:
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

    def readinto(self, buf: bytearray | memoryview, offset: int) -> int:
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

    def read_to_fd(self, fd: int, offset: int, length: int,
                   ack: Callable[[int], None], positional: bool = True,
                   fd_offset: int | None = None) -> None:
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

        to = fd_offset - offset
        with self.get(offset, length) as body:
            for view, pos in body:
                if positional:
                    pwrite_all(fd, view, pos + to)
                else:
                    rest = view
                    while rest:
                        rest = rest[os.write(fd, rest):]
                ack(len(view))

    def get(self, offset: int, length: int) -> Body:
        """GET ``length`` bytes at ``offset`` as one request, its body
        handed out in order by the ``Body`` (use it as a context manager).
        """
        return Body(self, offset, length)

    def _splice_to_fd(self, fd: int, offset: int, length: int,
                      ack: Callable[[int], None], positional: bool,
                      fd_offset: int) -> None:
        pos = offset

        def acked(n: int) -> None:
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

    def write(self, data: bytes | bytearray | memoryview, offset: int,
              flush: bool = True) -> None:
        """PUT ``data`` (bytes-like) at ``offset``."""
        view = memoryview(data).cast("B")
        self._put(offset, len(view), flush, lambda sock: sock.sendall(view))

    def write_from_fd(self, fd: int, offset: int, length: int,
                      flush: bool = True,
                      src_offset: int | None = None) -> None:
        """PUT ``length`` bytes of file ``fd`` (at ``src_offset``, default
        ``offset``) to the image at ``offset``."""
        if src_offset is None:
            src_offset = offset
        self.write_from_files([(fd, src_offset, length)], offset, flush)

    def write_from_files(self, parts: list[FilePart], offset: int,
                         flush: bool = True) -> None:
        """PUT file ranges ``parts`` (``(fd, file offset, length)`` each),
        one after the other, to the image at ``offset``: one request, the
        kernel moving the bytes (through a buffer under TLS)."""
        length = sum(n for _, _, n in parts)
        if self.transport.encrypted:
            def send(sock: socket.socket) -> None:
                buf = self._buffer()
                for fd, src_offset, n in parts:
                    _send_copied(sock, fd, src_offset, n, buf)
        else:
            def send(sock: socket.socket) -> None:
                for fd, src_offset, n in parts:
                    _sendfile(sock, fd, src_offset, n)
        self._put(offset, length, flush, send)

    def _put(self, offset: int, length: int, flush: bool,
             send_body: Callable[[socket.socket], None]) -> None:
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


def _is_network_error(error: OSError) -> bool:
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


def _wait_writable(sock: socket.socket) -> None:
    timeout = sock.gettimeout()
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    if not poller.poll(None if timeout is None else timeout * 1000):
        raise TimeoutError("timed out sending the request body")


def _sendfile(sock: socket.socket, fd: int, offset: int, count: int) -> None:
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


def _send_copied(sock: socket.socket, fd: int, offset: int, count: int,
                 view: memoryview) -> None:
    """Send ``count`` bytes of ``fd`` at ``offset`` through a buffer (TLS)."""
    while count:
        chunk = view[:min(count, len(view))]
        n = os.preadv(fd, [chunk], offset)
        if not n:
            raise SourceError(f"source ended at offset {offset}")
        sock.sendall(chunk[:n])
        offset += n
        count -= n


class Body:
    """The body of one GET, handed out ``STREAM_CHUNK`` bytes at a time:
    ``(view, offset)`` pairs, in order, each view valid until the next.

    The caller drives it (``for view, pos in body``), so the bytes go one
    way, from the connection to whatever writes them. A failure of the
    caller's own leaves the response unread: leaving the ``with`` block
    by an exception closes the connection, and an ``OSError`` with a
    network errno (a reader gone from a pipe) is reported as the
    connection's failure, as a broken socket would be.
    """

    def __init__(self, con: ImageConnection, offset: int,
                 length: int) -> None:
        self._con = con
        self._offset = offset
        self._length = length
        #: Where the chunk in the caller's hands starts.
        self._at = offset

    def __enter__(self) -> Body:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None or isinstance(exc, ConnectionFailed):
            return
        self._con.close()
        if isinstance(exc, OSError) and _is_network_error(exc):
            raise self._con._failed(f"GET at offset {self._at}", exc) from exc

    def __iter__(self) -> Iterator[tuple[memoryview, int]]:
        con = self._con
        view = con._buffer()[:STREAM_CHUNK]
        pos = self._offset
        end = pos + self._length
        try:
            readinto = con._start_get(pos, self._length).readinto
            while pos < end:
                n = readinto(view[:min(end - pos, len(view))])
                if not n:
                    raise ConnectionFailed("body ended early")
                self._at = pos
                yield view[:n], pos
                pos += n
        except (OSError, http.client.HTTPException, ConnectionFailed) as e:
            if isinstance(e, OSError) and not _is_network_error(e):
                con.close()
                raise
            raise con._failed(f"GET at offset {pos}", e) from e
