"""HTTP over a UNIX stream socket, as a drop-in ``http.client`` connection.

A server such as diskferry or ovirt-imageio advertises its local socket in
``OPTIONS`` as ``unix_socket``. The address is either a filesystem path or
a Linux abstract address, which the server sends with its leading NUL
(``"\\0/org/ovirt/imageio"``); ``"@name"``, the spelling of ``ss`` and
``socat``, is accepted as well. Pass the address exactly as received::

    con = UnixHTTPConnection(options["unix_socket"], timeout=60)
    con.request("GET", "/images/" + ticket_id)

Everything else (request, getresponse, keep-alive) is ``http.client``.
"""

from __future__ import annotations

import enum
import http.client
import socket
from collections.abc import Mapping
from typing import NoReturn

from diskferry.client.errors import TunnelNotSupported
from diskferry.sockaddr import display_address, kernel_address


class _Unset(enum.Enum):
    """A timeout left out: the socket keeps ``socket.getdefaulttimeout()``,
    as ``http.client`` does."""

    TIMEOUT = "the socket module's default"


#: The ``timeout`` of a connection that sets none of its own.
DEFAULT_TIMEOUT = _Unset.TIMEOUT

#: What ``http.client`` keeps as a connection's timeout when none is
#: given (a private marker of the socket module, learned, not named).
_NO_TIMEOUT: object = http.client.HTTPConnection("localhost").timeout


class UnixHTTPConnection(http.client.HTTPConnection):
    """An ``HTTPConnection`` whose socket is a UNIX stream socket.

    ``timeout`` bounds the connect and every later socket operation, as
    for ``HTTPConnection``. The ``Host`` header says ``localhost``.
    """

    def __init__(self, address: str | bytes,
                 timeout: float | None | _Unset = DEFAULT_TIMEOUT,
                 blocksize: int = 8192) -> None:
        if isinstance(timeout, _Unset):
            super().__init__("localhost", blocksize=blocksize)
        else:
            super().__init__("localhost", timeout=timeout,
                             blocksize=blocksize)
        self.address = kernel_address(address)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.timeout is not _NO_TIMEOUT:
                sock.settimeout(self.timeout)
            sock.connect(self.address)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def set_tunnel(self, host: str, port: int | None = None,
                   headers: Mapping[str, str] | None = None) -> NoReturn:
        raise TunnelNotSupported(
            "a UNIX socket connection cannot go through an HTTP proxy tunnel"
        )

    def __repr__(self) -> str:
        return f"<UnixHTTPConnection {display_address(self.address)!r}>"
