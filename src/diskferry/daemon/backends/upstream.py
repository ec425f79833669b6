"""Kept-alive connections to the images-API server behind proxy tickets.

A proxy ticket names an image on another server (``https://host:54322/
images/ID``). Every client connection that uses the ticket opens its own
backend, but they all draw upstream connections from one pool per
ticket, so that the server is asked ``OPTIONS`` once and a connection
outlives the client request, and the client connection, that used it::

    attach(ticket)   first user: OPTIONS through the client library
                     (features, max_readers/max_writers, and the
                     transport: the server's UNIX socket when it runs on
                     this host, confirmed by its server_id, else TLS/TCP);
                     users arriving meanwhile wait for it
    acquire()        the most recently used idle connection (the least
                     likely to have reached the server's idle timeout);
                     one the server has closed meanwhile reconnects on
                     its next request instead of failing it
    release(con)     back to the idle list, which holds at most as many
                     connections as the server takes at once
    detach(ticket)   last user: the pool lingers LINGER seconds, then
                     closes; a client that probes with OPTIONS on one
                     connection and copies on others, or pauses between
                     transfers, finds it open. A ticket removed meanwhile
                     has its pool closed by the next attach of any ticket

Connections reconnect by themselves (``ImageConnection`` opens a new
socket for a request after a failure closed the old one), so nothing
here retries; the backend decides what may be sent again.
"""

import logging
import threading
import urllib.parse
from typing import TYPE_CHECKING, Any, NamedTuple

from diskferry.client import session as client_session
from diskferry.client.connection import ImageConnection
from diskferry.client.errors import ClientError
from diskferry.client.policy import Timeout
from diskferry.errors import BackendError
from diskferry.sockaddr import kernel_address

if TYPE_CHECKING:
    from diskferry.daemon.tickets import Ticket


log = logging.getLogger("diskferry.daemon.backends.upstream")


class Settings(NamedTuple):
    """How upstream connections are opened (``[backend_http]``)."""

    #: CA certificates verifying https:// servers; None: the system's.
    cafile: str | None
    timeout: Timeout
    #: This daemon's own UNIX socket address, if it has one.
    own_socket: str | None = None


def describe(url: str) -> str:
    """The server of ``url`` for messages: never its path, whose ticket id
    is the upstream's bearer secret."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class UpstreamPool:
    """Idle connections to one ticket's image on the upstream server."""

    def __init__(self, url: str, settings: Settings) -> None:
        self.server = describe(url)
        session = self._open(url, settings, "never")
        advertised = session.options.unix_socket
        # An upstream advertising the address this daemon listens on is
        # on another host (another network namespace) with the same
        # socket: the socket here leads back to this daemon, which would
        # open this ticket's pool again to answer the probe.
        if advertised and kernel_address(advertised) == \
                settings.own_socket:
            log.info("%s advertises this daemon's own socket address: it "
                     "runs on another host; staying on %s", self.server,
                     session.transport.describe())
        elif advertised:
            session.close()
            session = self._open(url, settings, "auto")
        self._session = session
        #: What OPTIONS told; an old server without OPTIONS offers nothing.
        self.features: frozenset[str] = frozenset(session.features)
        allow = session.options.allow
        #: Whether the upstream's ticket takes writes (its ``Allow``; a
        #: server that sends none is asked and answers for itself).
        self.writable: bool = allow is None or "PUT" in allow
        self.max_readers: int = session.max_readers
        self.max_writers: int = session.max_writers
        #: The image's size, once a backend asked the server for it.
        self.size: int | None = None
        self._limit = max(self.max_readers, self.max_writers)
        self._idle: list[ImageConnection] = [session.primary]
        self._lock = threading.Lock()
        self._closed = False

    def _open(self, url: str, settings: Settings, unix: str) -> Any:
        try:
            return client_session.open(url, "r", cafile=settings.cafile,
                                       unix=unix, timeout=settings.timeout)
        except ClientError as e:
            raise BackendError(f"Cannot open the image on {self.server}: "
                               f"{e}") from e

    def acquire(self) -> ImageConnection:
        with self._lock:
            con = self._idle.pop() if self._idle else None
        if con is None:
            new: ImageConnection = self._session.connection()
            return new
        if not con.reusable():
            con.close()  # the next request opens a new socket
        return con

    def release(self, con: ImageConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._limit:
                self._idle.append(con)
                return
        con.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for con in idle:
            con.close()


#: Seconds a pool no client connection uses stays open: shorter than a
#: server's usual inactivity timeout (60 s), which would close its
#: connections anyway.
LINGER = 30.0


class _Entry:
    """A ticket's pool, being opened (``opened`` not set) or open."""

    def __init__(self) -> None:
        self.pool: UpstreamPool | None = None
        self.error = ""
        self.opened = threading.Event()
        self.users = 1
        self.timer: threading.Timer | None = None

    def use(self) -> None:
        self.users += 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


_lock = threading.Lock()
#: Pools by ticket (a replaced ticket is a new object: a new pool).
_pools: "dict[Ticket, _Entry]" = {}


def attach(ticket: "Ticket", settings: Settings) -> UpstreamPool:
    """The ticket's pool, opened (OPTIONS sent) by its first user.

    Users arriving while it is being opened wait for it, at most the
    connect timeout: a ticket URL that leads back to this daemon makes the
    opening wait for a request that waits for the opening, and that ends
    in an error, not in one pool opening another without end.
    """
    with _lock:
        removed = _removed_tickets()
        entry = _pools.get(ticket)
        if entry is None:
            entry = _pools[ticket] = _Entry()
            opening = True
        else:
            entry.use()
            opening = False
    for pool in removed:
        pool.close()
    if opening:
        try:
            entry.pool = UpstreamPool(ticket.spec.url, settings)
        except BaseException as e:
            with _lock:
                del _pools[ticket]
            entry.error = str(e)
            raise
        finally:
            entry.opened.set()
        return entry.pool
    if not entry.opened.wait(settings.timeout.connect):
        detach(ticket, None)
        raise BackendError(
            f"{describe(ticket.spec.url)} did not answer OPTIONS in time "
            f"(does the ticket URL lead back to this daemon?)")
    if entry.pool is None:
        raise BackendError(entry.error)
    return entry.pool


def detach(ticket: "Ticket", pool: UpstreamPool | None) -> None:
    """One user fewer; the pool closes LINGER seconds after the last."""
    with _lock:
        entry = _pools.get(ticket)
        if entry is None or (pool is not None and entry.pool is not pool):
            entry = None
        else:
            entry.users -= 1
            if entry.users or entry.pool is None:
                return
            if not ticket.canceled:  # a removed ticket has no next user
                entry.timer = threading.Timer(LINGER, _expire,
                                              (ticket, entry))
                entry.timer.daemon = True
                entry.timer.start()
                return
            del _pools[ticket]
    if pool is not None:
        pool.close()


def _removed_tickets() -> list[UpstreamPool]:
    """Take out the lingering pools of tickets removed meanwhile (called
    under the lock; the caller closes them)."""
    gone = [(ticket, entry) for ticket, entry in _pools.items()
            if ticket.canceled and not entry.users and entry.pool is not None]
    for ticket, entry in gone:
        if entry.timer is not None:
            entry.timer.cancel()
        del _pools[ticket]
    return [entry.pool for _, entry in gone if entry.pool is not None]


def _expire(ticket: "Ticket", entry: _Entry) -> None:
    with _lock:
        if entry.users or _pools.get(ticket) is not entry:
            return
        del _pools[ticket]
    if entry.pool is not None:
        entry.pool.close()
