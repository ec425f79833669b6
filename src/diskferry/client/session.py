"""A transfer session: one image URL, the best transport to reach it.

``open()`` sends ``OPTIONS`` on the URL's TCP/TLS connection, learns
what the server offers, and decides whether to switch to the server's
UNIX socket::

    unix="never"  -> stay on TCP/TLS
    unix="always" -> use the socket or fail (UnixSocketUnavailable)
    unix="auto"   -> use the socket when the server is on this host:
                       host_id extension equal to ours, or (servers
                       without it) the peer address is one of ours;
                     and OPTIONS over the socket knows the ticket (and
                     reports the same server_id) -- else stay, and say why

The reason is kept in ``Session.transport_reason`` and logged, so that a
slow transfer on TLS can be explained.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections import namedtuple
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

from diskferry.client import locality
from diskferry.client.connection import BUFFER_SIZE, ImageConnection
from diskferry.client.errors import (
    ClientError,
    ProtocolError,
    UnixSocketUnavailable,
    UnsupportedOperation,
)
from diskferry.client.extents import parse_extents
from diskferry.client.policy import Timeout
from diskferry.client.transport import Transport
from diskferry.extent import Extent
from diskferry.hostid import host_id
from diskferry.sockaddr import display_address, kernel_address

log = logging.getLogger("diskferry.client")

UNIX_MODES = ("auto", "always", "never")

#: Extents asked for per request where the server allows a range: one
#: answer stays small and quick even on a fragmented multi-TiB image.
#: Each window costs a copy an HTTP round trip, so it is 64 times
#: ``diskferry.checksum.CHECKSUM_EXTENTS_WINDOW`` (1 GiB), which asks its
#: backend directly, with no round trip to save, and hashes each window
#: before asking for the next.
DOWNLOAD_EXTENTS_WINDOW = 64 * 1024**3


class ServerOptions(namedtuple("ServerOptions", (
        "features allow max_readers max_writers unix_socket host_id "
        "server_id known"),
        defaults=(frozenset(), None, 1, 1, None, None, None, True))):
    """What ``OPTIONS`` told about the image and the server.

    ``known`` is False for old servers that answer OPTIONS with 405 or
    204; ``host_id``/``server_id`` are None without the extension.
    """

    __slots__ = ()
    features: frozenset[str]
    allow: frozenset[str] | None
    max_readers: int
    max_writers: int
    unix_socket: str | None
    host_id: str | None
    server_id: str | None
    known: bool

    @classmethod
    def parse(cls, answer: tuple[set[str], dict[str, Any]] | None
              ) -> ServerOptions:
        if answer is None:
            return cls(known=False)
        allow, data = answer
        unix_socket = data.get("unix_socket")
        return cls(
            features=frozenset(data.get("features") or ()),
            allow=frozenset(allow) if allow else None,
            max_readers=_positive(data.get("max_readers")),
            max_writers=_positive(data.get("max_writers")),
            unix_socket=kernel_address(unix_socket) if unix_socket else None,
            host_id=data.get("host_id") or None,
            server_id=data.get("server_id") or None,
        )


class ConnectionOptions(TypedDict, total=False):
    """The keywords of ``open()`` that say how to reach the server, which
    ``upload()`` and ``download()`` take too."""

    cafile: str | None
    secure: bool
    unix: str
    timeout: Timeout


if TYPE_CHECKING:
    class SupportsFileno(Protocol):
        """A file object: what ``Session.write_from`` reads."""

        def fileno(self) -> int: ...


def _positive(value: object) -> int:
    return value if isinstance(value, int) and value > 0 else 1


class Session:
    """Operations on one image through the chosen transport.

    Methods use one connection and are not thread-safe; call
    ``connection()`` for more connections (one per thread).
    """

    def __init__(self, url: str, mode: str, path: str,
                 options: ServerOptions, transport: Transport,
                 con: ImageConnection, reason: str) -> None:
        self.url = url
        self.mode = mode
        self.path = path
        self.options = options
        self.transport = transport
        self.transport_reason = reason
        self._con = con
        self._size: int | None = None

    # -- facts

    @property
    def features(self) -> frozenset[str]:
        return self.options.features

    @property
    def max_readers(self) -> int:
        return self.options.max_readers

    @property
    def max_writers(self) -> int:
        return self.options.max_writers

    def connection(self) -> ImageConnection:
        """A new connection to the image on the session's transport."""
        return ImageConnection(self.transport, self.path,
                               self._con.buffer_size)

    @property
    def primary(self) -> ImageConnection:
        """The session's own connection (for a worker of a copy)."""
        return self._con

    # -- operations

    def size(self) -> int:
        if self._size is None:
            self._size = self._con.probe_size()
        return self._size

    def extents(self, context: str = "zero") -> list[Extent]:
        """The image's extents (``Extent`` list) in context zero or dirty."""
        self._require("extents")
        extents = parse_extents(self._con.extents(context))
        if extents:
            self._size = extents[-1].end
        return extents

    def walk_extents(self, context: str = "zero",
                     window: int = DOWNLOAD_EXTENTS_WINDOW
                     ) -> Iterator[Extent]:
        """Return an iterator over the image's extents, a window at a time.

        Servers with the ``start``/``length`` extension answer one window
        per request, so a huge image never needs one slow answer; others
        ignore the window and answer the whole image at once, which is
        noticed and used as is. The first window is fetched now on the
        session's connection; later ones, fetched as the iterator is
        consumed (from any thread), on a connection of their own.
        """
        self._require("extents")
        size = self.size()
        first = self._extents_window(self._con, context, 0, window, size)
        return self._more_extents(first, context, window, size)

    def _more_extents(self, extents: list[Extent], context: str, window: int,
                      size: int) -> Iterator[Extent]:
        yield from extents
        pos = extents[-1].end if extents else size
        if pos >= size:
            return
        con = self.connection()
        try:
            while pos < size:
                extents = self._extents_window(con, context, pos, window, size)
                yield from extents
                pos = extents[-1].end
        finally:
            con.close()

    @staticmethod
    def _extents_window(con: ImageConnection, context: str, pos: int,
                        window: int, size: int) -> list[Extent]:
        """Extents of ``[pos, pos+window)`` (or more, if the server ignores
        the window), clipped to start at ``pos``."""
        if pos >= size:
            return []
        answer = con.extents(context, pos, min(window, size - pos))
        whole = bool(answer) and answer[0].get("start") == 0
        extents = parse_extents(answer, start=0 if whole else pos)
        if not extents or extents[-1].end <= pos:
            raise ProtocolError(f"no extents for offset {pos}")
        if extents[-1].end > size:
            raise ProtocolError(f"extents end past the image size {size}")
        out: list[Extent] = []
        for ext in extents:
            if ext.end <= pos:
                continue
            if ext.start < pos:
                ext = Extent(pos, ext.end - pos, ext.zero, ext.hole, ext.dirty)
            out.append(ext)
        return out

    def checksum(self, algorithm: str | None = None,
                 block_size: int | None = None) -> dict[str, Any]:
        """The server's checksum answer: dict with checksum, algorithm,
        block_size."""
        self._require("checksum")
        return self._con.checksum(algorithm, block_size)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self._con.readinto(buf, offset)
        return bytes(buf)

    def readinto(self, buf: bytearray | memoryview, offset: int) -> int:
        """Fill ``buf`` with the image's bytes at ``offset``."""
        return self._con.readinto(buf, offset)

    def write(self, data: bytes | bytearray | memoryview, offset: int,
              flush: bool = False) -> None:
        """Write ``data`` at ``offset`` (durable after ``flush()``)."""
        self._require_write()
        self._con.write(data, offset, flush=self._put_flush(flush))

    def write_from(self, file: int | SupportsFileno, offset: int, length: int,
                   src_offset: int | None = None,
                   flush: bool = False) -> None:
        """Write ``length`` bytes of a local file (object or descriptor),
        read at ``src_offset`` (default ``offset``), to the image."""
        self._require_write()
        fd = file if isinstance(file, int) else file.fileno()
        self._con.write_from_fd(fd, offset, length, self._put_flush(flush),
                                src_offset)

    def zero(self, offset: int, length: int, flush: bool = False) -> None:
        """Make a range read as zeros (PUT of zeros on servers without
        the zero feature)."""
        self._require_write()
        if "zero" in self.features:
            self._con.zero(offset, length, flush)
            return
        zeros = bytes(min(length, self._con.buffer_size))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self._con.write(memoryview(zeros)[:n], offset,
                            flush=self._put_flush(flush))
            offset += n

    def flush(self) -> None:
        """Make every write so far durable (on every connection)."""
        self._require_write()
        if "flush" in self.features:
            self._con.flush()

    def _put_flush(self, flush: bool) -> bool:
        # Servers without the flush feature flush every PUT anyway.
        return flush or "flush" not in self.features

    def _require(self, feature: str) -> None:
        if self.options.known and feature not in self.features:
            raise UnsupportedOperation(
                f"the server does not offer {feature} for this image")
        if not self.options.known:
            raise UnsupportedOperation(
                f"the server is too old for {feature} (no OPTIONS)")

    def _require_write(self) -> None:
        if self.mode != "w":
            raise UnsupportedOperation("session opened for reading (mode='r')")

    # -- lifetime

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Session {self.path} via {self.transport.describe()} "
                f"mode={self.mode}>")


def open(url: str, mode: str = "r", *, cafile: str | None = None,
         secure: bool = True, unix: str = "auto", timeout: Timeout = Timeout(),
         buffer_size: int = BUFFER_SIZE) -> Session:
    """Open a transfer URL ``https://host:port/images/TICKET``.

    ``mode`` is "r" or "w"; ``cafile`` verifies the server's certificate
    (``secure=False`` skips verification); ``unix`` chooses the UNIX
    socket policy (see the module docstring); ``timeout`` is a
    ``Timeout``. Returns a ``Session``; use it as a context manager.
    """
    if mode not in ("r", "w"):
        raise ValueError(f"mode must be 'r' or 'w', not {mode!r}")
    if unix not in UNIX_MODES:
        raise ValueError(f"unix must be one of {UNIX_MODES}, not {unix!r}")
    path = urllib.parse.urlsplit(url).path
    if not path.startswith("/images/") or path == "/images/":
        raise ClientError(f"not a transfer URL (no /images/TICKET): {url!r}")
    remote = Transport.from_url(url, cafile=cafile, secure=secure,
                                timeout=timeout)
    con = ImageConnection(remote, path, buffer_size)
    try:
        options = ServerOptions.parse(con.options())
        if mode == "w" and options.allow is not None and \
                "PUT" not in options.allow:
            raise UnsupportedOperation(
                "the ticket does not allow writing (OPTIONS allows "
                f"{','.join(sorted(options.allow))})")
        transport, con, reason = _choose_transport(con, options, unix)
    except BaseException:
        con.close()
        raise
    log.info("using %s: %s", transport.describe(), reason)
    return Session(url, mode, path, options, transport, con, reason)


def _choose_transport(con: ImageConnection, options: ServerOptions,
                      unix: str) -> tuple[Transport, ImageConnection, str]:
    """Return (transport, connection, reason) per the module docstring."""
    remote = con.transport
    if unix == "never":
        return remote, con, "UNIX socket not wanted (unix=never)"
    if not options.unix_socket:
        if unix == "always":
            raise UnixSocketUnavailable(
                "unix=always, but the server offers no UNIX socket")
        return remote, con, "the server offers no UNIX socket"

    if unix == "auto":
        local, why = _server_is_local(con, options)
        if not local:
            return remote, con, why
    else:
        why = "unix=always"

    socket_transport = Transport.unix(options.unix_socket, remote.timeout)
    local_con = ImageConnection(socket_transport, con.path, con.buffer_size)
    shown = display_address(options.unix_socket)
    # An image that takes one connection at a time (an NBD export without
    # multi-conn) would make the socket wait for this one; it reconnects
    # if the socket turns out unusable.
    con.close()
    try:
        answer = local_con.options()
        if answer is None:
            raise ProtocolError("no OPTIONS answer on the socket")
        server_id = answer[1].get("server_id")
        if options.server_id and server_id != options.server_id:
            raise ProtocolError(
                "the socket reaches another daemon (server_id "
                f"{server_id!r}, expected {options.server_id!r})")
    except ClientError as e:
        local_con.close()
        if unix == "always":
            raise UnixSocketUnavailable(
                f"cannot use UNIX socket {shown}: {e}") from e
        reason = (f"UNIX socket {shown} unusable ({e}); "
                  f"falling back to {remote.kind}")
        log.warning("%s", reason)
        return remote, con, reason
    con.close()
    return socket_transport, local_con, f"server is local ({why})"


def _server_is_local(con: ImageConnection,
                     options: ServerOptions) -> tuple[bool, str]:
    """Return (is_local, reason) from host ids or the peer address."""
    if options.host_id:
        mine = host_id()
        if mine == options.host_id:
            return True, "host id matches"
        return False, (f"server runs on another host (host id "
                       f"{options.host_id}, ours {mine})")
    peer = con.peer_address()
    if peer is None:
        return False, "peer address unknown"
    if locality.is_own_address(peer):
        return True, f"peer address {peer} is ours"
    return False, f"peer address {peer} is not an address of this host"
