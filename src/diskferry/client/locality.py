"""Is the server on this host? Facts for choosing the UNIX socket.

Two ways to tell, best first:

- The server's ``host_id`` (an extension of ``OPTIONS``) equals this
  host's id, read from the same file the server reads: ``/etc/vdsm/vdsm.id``
  where it exists (the id oVirt knows the host by), else
  ``/etc/machine-id``. Robust behind NAT, proxies and multi-homing.
- Servers without it: the peer address of the TCP connection is one of
  this host's own addresses (loopback, or an address some interface
  holds: binding a socket to it succeeds only then).

Either is only a hint; the session still confirms over the socket that
it reaches the same daemon and that it knows the ticket.
"""

from __future__ import annotations

import ipaddress
import socket


def is_own_address(address: str) -> bool:
    """True if ``address`` (an IP string, with %scope for IPv6) is ours."""
    host = address.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return is_own_address(str(ip.ipv4_mapped))
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True
