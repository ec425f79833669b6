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

import http.client
import socket

from diskferry.client.errors import TunnelNotSupported
from diskferry.sockaddr import display_address, kernel_address


class UnixHTTPConnection(http.client.HTTPConnection):
    """An ``HTTPConnection`` whose socket is a UNIX stream socket.

    ``timeout`` bounds the connect and every later socket operation, as
    for ``HTTPConnection``. The ``Host`` header says ``localhost``.
    """

    def __init__(self, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT,
                 blocksize=8192):
        super().__init__("localhost", timeout=timeout, blocksize=blocksize)
        self.address = kernel_address(address)

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(self.timeout)
            sock.connect(self.address)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def set_tunnel(self, host, port=None, headers=None):
        raise TunnelNotSupported(
            "a UNIX socket connection cannot go through an HTTP proxy tunnel"
        )

    def __repr__(self):
        return f"<UnixHTTPConnection {display_address(self.address)!r}>"
