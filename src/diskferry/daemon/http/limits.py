"""How many connections a service takes in, and which ones wait the least.

Two bounds keep one kind of peer from locking others out:

    ConnectionLimit     connections open at once, shared by the services
                        that serve images; ``reserved`` of them only the
                        local socket may use, so that remote peers, who
                        need no ticket to connect, can never take them all
    PendingConnections  per service, the connections that have not yet
                        started a request (TLS handshake or first head
                        still to come); past its cap the oldest of them
                        is cut, so that a flood of silent connects costs
                        threads for a moment only and a client that
                        handshakes in milliseconds still gets in

A connection counts in both from accept; it leaves the pending set when
its first request starts, and the limit when it closes.
"""

from __future__ import annotations

import socket
import threading

#: Connections open at once when the configuration does not say: each
#: costs a thread and up to four descriptors (socket, image, splice pipe);
#: past this, a flood of idle peers would exhaust threads or descriptors.
#: ovirt-imageio has no cap (a thread for every connection).
DEFAULT_CONNECTION_LIMIT = 1000

#: Connections of the limit only the local socket may use when the
#: configuration does not say (at most half the limit, see
#: ``ConnectionLimit``): a quarter, room for many local transfers at once.
DEFAULT_LOCAL_RESERVE = 250

#: Connections per service that may wait for their handshake or first
#: head at once. A real client handshakes and sends its head within
#: milliseconds of connecting, so a burst of clients keeps few pending at
#: a time: 256 TLS handshakes take about half a second of two cores, the
#: window in which a larger burst could see its first connections cut.
#: nginx and Apache have no such bound, and drop nothing, but hold a slot
#: per connection for the whole header timeout.
DEFAULT_PENDING_LIMIT = 256

#: Seconds a new connection has for its TLS handshake and its first
#: request head together (the head deadline, when shorter, applies).
PRE_REQUEST_TIMEOUT = 10.0


class ConnectionLimit:
    """How many connections may be open at once, shared by services.

    Each service counts its connections through its share: one given the
    reserve (``share(reserved=True)``) may open connections up to the
    whole ``limit``; any other at most ``limit - reserved`` of its own,
    so that ``reserved`` (at most half the limit) are always left to the
    first.
    """

    def __init__(self, limit: int = DEFAULT_CONNECTION_LIMIT,
                 reserved: int = 0) -> None:
        self.limit = limit
        self.reserved = min(reserved, limit // 2)
        self.lock = threading.Lock()
        self.count = 0

    def share(self, reserved: bool = False) -> LimitShare:
        """A service's part of the limit: all of it with ``reserved``,
        else all but the reserve."""
        return LimitShare(self, self.limit if reserved
                          else self.limit - self.reserved)


class LimitShare:
    """One service's part of a shared ``ConnectionLimit``: it may count a
    connection while it has fewer than ``limit`` open and the services
    together fewer than the whole limit."""

    def __init__(self, pool: ConnectionLimit, limit: int) -> None:
        self.pool = pool
        self.limit = limit
        self.count = 0

    def acquire(self) -> bool:
        """Count one more connection; False, counting none, when full."""
        pool = self.pool
        with pool.lock:
            if self.count >= self.limit or pool.count >= pool.limit:
                return False
            self.count += 1
            pool.count += 1
            return True

    def release(self) -> None:
        with self.pool.lock:
            self.count -= 1
            self.pool.count -= 1


class PendingConnections:
    """The connections of a service that have not started a request yet,
    oldest first; at most ``limit`` of them are left waiting.

    A connection is known by its descriptor, which stays the same when
    TLS wraps the socket. Its thread removes it before closing it, and
    cutting one happens under the same lock, so a descriptor is never
    shut down after it was closed and reused.
    """

    def __init__(self, limit: int = DEFAULT_PENDING_LIMIT) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._waiting: dict[int, None] = {}

    def add(self, fd: int) -> int:
        """Count ``fd`` as pending; cut the oldest ones past the cap (their
        threads wake up from the handshake or the head with an error).
        Returns how many were cut."""
        with self._lock:
            self._waiting[fd] = None
            cut = 0
            while len(self._waiting) > self.limit:
                oldest = next(iter(self._waiting))
                del self._waiting[oldest]
                _shutdown_fd(oldest)
                cut += 1
            return cut

    def remove(self, fd: int) -> None:
        """``fd`` started a request, or is about to close: not pending."""
        with self._lock:
            self._waiting.pop(fd, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)


def _shutdown_fd(fd: int) -> None:
    """Shut down the socket on ``fd`` without closing it (its owner does)."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()
