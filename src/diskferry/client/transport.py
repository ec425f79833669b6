"""Where and how to open connections to an image server.

A ``Transport`` is an immutable recipe (TCP, TLS or a UNIX socket, plus
the timeouts): the session picks one after ``OPTIONS`` and every worker
of a copy opens its own connections from it.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import urllib.parse
from collections import namedtuple

from diskferry.client.errors import ClientError
from diskferry.client.policy import Timeout
from diskferry.client.uhttp import UnixHTTPConnection
from diskferry.sockaddr import display_address

#: Socket buffer for bulk transfers: large enough that a multi-MiB request
#: needs few wake-ups, small enough to be a harmless default.
SOCKET_BUFFER_SIZE = 4 * 1024**2


def ssl_context(cafile: str | None = None,
                secure: bool = True) -> ssl.SSLContext:
    """A client TLS context: verify against ``cafile`` (or the system CAs)
    unless ``secure`` is False."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not secure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Transport(namedtuple("Transport", "kind host port address context timeout",
                           defaults=(None, None, None, None, Timeout()))):
    """How to reach the server: ``kind`` is "unix", "tls" or "tcp"; a
    host and port, or a UNIX socket ``address``; the TLS ``context``."""

    __slots__ = ()
    kind: str
    host: str | None
    port: int | None
    address: str | None
    context: ssl.SSLContext | None
    timeout: Timeout

    @classmethod
    def from_url(cls, url: str, *, cafile: str | None = None,
                 secure: bool = True,
                 timeout: Timeout = Timeout()) -> Transport:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ClientError(f"unsupported URL scheme in {url!r}: use https")
        if not parts.hostname:
            raise ClientError(f"no host in URL {url!r}")
        if parts.scheme == "https":
            return cls("tls", parts.hostname, parts.port or 443,
                       context=ssl_context(cafile, secure), timeout=timeout)
        return cls("tcp", parts.hostname, parts.port or 80, timeout=timeout)

    @classmethod
    def unix(cls, address: str, timeout: Timeout = Timeout()) -> Transport:
        return cls("unix", address=address, timeout=timeout)

    @property
    def encrypted(self) -> bool:
        return self.kind == "tls"

    def describe(self) -> str:
        if self.address is not None:
            return f"unix socket {display_address(self.address)}"
        return f"{self.kind} {self.host}:{self.port}"

    def host_header(self) -> str:
        """The ``Host`` header value for requests on this transport."""
        host, port = self._endpoint()
        if not host:
            return "localhost"
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{port}"

    def _endpoint(self) -> tuple[str, int]:
        """Host and port of a TCP or TLS transport; ("", 0) for a UNIX one."""
        if self.host is None or self.port is None:
            return "", 0
        return self.host, self.port

    def connection(self) -> http.client.HTTPConnection:
        """Return a new, connected ``http.client`` connection.

        The connect timeout applies to connecting (and the TLS handshake);
        the read timeout to everything after.
        """
        t = self.timeout
        host, port = self._endpoint()
        con: http.client.HTTPConnection
        if self.address is not None:
            con = UnixHTTPConnection(self.address, timeout=t.connect)
        elif self.kind == "tls":
            con = http.client.HTTPSConnection(
                host, port, timeout=t.connect, context=self.context)
        else:
            con = http.client.HTTPConnection(host, port, timeout=t.connect)
        try:
            con.connect()
            sock = con.sock
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_SIZE)
            if self.kind != "unix":
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(t.read)
            con.timeout = t.read
        except BaseException:
            con.close()
            raise
        return con
