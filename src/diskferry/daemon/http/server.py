"""A threaded HTTP/1.1 server: one accept thread, one thread per connection.

    listening socket --accept--> worker thread
                                   TLS handshake (bounded by a timeout)
                                   context = app.connection_opened(id)
                                   loop: serve_request (exchange.py)
                                           conn.read_request()
                                           -> app.handle(request)
                                         -> access log line
                                   app.connection_closed(context)

The connection owns the framing (head limits, body length, chunks,
100-continue, whether another request may follow); the server accepts,
runs one exchange after another per connection, and logs each.

Blocking I/O in threads is enough here: a server moves bulk data over a
few dozen connections, and every syscall releases the GIL.

Connections open at once are capped (``ConnectionLimit``, shared by the
services that serve clients): past the cap a new connection is answered
``503`` with ``Retry-After`` and closed, never queued or left hanging.

Errors become answers in one place, ``exchange.serve_request``: a
``RequestError`` becomes its status and a text body; ``ConnectionGone``
closes the connection silently; anything else is logged and answered
with a 500 whose body says nothing of the internals.
"""

import errno
import logging
import socket
import ssl
import threading
import time
from functools import partial
from typing import Generic

from diskferry.daemon.http import accesslog
from diskferry.daemon.http.connection import HEAD_TIMEOUT, Connection
from diskferry.daemon.http.exchange import (
    Application,
    Outcome,
    send_error,
    serve_request,
)
from diskferry.daemon.http.listener import describe
from diskferry.daemon.http.observer import NO_OBSERVER, ServerObserver
from diskferry.daemon.http.request import StateT
from diskferry.errors import ServiceUnavailable

log = logging.getLogger("diskferry.daemon.http")

#: Seconds a new TLS connection has to complete its handshake.
TLS_HANDSHAKE_TIMEOUT = 10.0

#: Seconds the accept loop sleeps when out of descriptors, instead of
#: spinning or dying; connections finishing will free some.
ACCEPT_BACKOFF = 0.1

#: Send buffer of a local (UNIX) connection. A UNIX stream socket
#: queues what its sender may have in flight; the default ~200 KiB makes
#: a reader of 8 MiB requests wake up dozens of times per request.
#: Capped by net.core.wmem_max (often 208 KiB, 4 MiB on some hosts).
UNIX_SEND_BUFFER = 4 * 1024**2

ACCEPT_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

#: Connections open at once when the configuration does not say: each
#: costs a thread and up to four descriptors (socket, image, splice pipe);
#: past this, a flood of idle peers would exhaust threads or descriptors.
#: ovirt-imageio has no cap (a thread for every connection).
DEFAULT_CONNECTION_LIMIT = 1000

#: Seconds a client refused for lack of room is told to wait (Retry-After).
RETRY_AFTER = 2

#: Seconds a refused TLS connection gets for its handshake and to read its
#: 503; a plain one is answered at once, without waiting on the peer.
REJECT_TIMEOUT = 2.0

#: Refused TLS connections answered at once (each needs a thread for its
#: handshake); past this they are closed unanswered, never kept waiting.
MAX_REJECTING = 16


class ConnectionLimit:
    """How many connections may be open at once; shared by services."""

    def __init__(self, limit: int = DEFAULT_CONNECTION_LIMIT) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self.count = 0

    def acquire(self) -> bool:
        """Count one more connection; False, counting none, when full."""
        with self._lock:
            if self.count >= self.limit:
                return False
            self.count += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.count -= 1


class Server(Generic[StateT]):
    """Serves ``app`` on one listening socket until ``stop()``.

    ``tls_context``, when given, wraps every accepted socket;
    ``observer`` is told of connections and requests (metrics).
    """

    def __init__(self, name: str, sock: socket.socket,
                 app: Application[StateT], *,
                 tls_context: ssl.SSLContext | None = None,
                 idle_timeout: float = 60.0,
                 head_timeout: float = HEAD_TIMEOUT,
                 limit: ConnectionLimit | None = None,
                 observer: ServerObserver = NO_OBSERVER) -> None:
        self.name = name
        self.sock = sock
        self.app = app
        self.tls_context = tls_context
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout
        self.limit = limit if limit is not None else ConnectionLimit()
        self.observer = observer
        self._rejecting = threading.BoundedSemaphore(MAX_REJECTING)
        self._full = False  # logged once per episode
        self.address = describe(sock)
        self._lock = threading.Lock()
        self._connections: dict[Connection, bool] = {}  # -> busy
        self._threads: set[threading.Thread] = set()
        self._stopping = False
        self._accept_thread: threading.Thread | None = None
        self._next_id = 0

    def start(self) -> None:
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"{self.name}-accept", daemon=True)
        self._accept_thread.start()

    # Accepting

    def _accept_loop(self) -> None:
        starved = False  # logged once per episode, not 10 times a second
        while not self._stopping:
            try:
                sock, addr = self.sock.accept()
            except OSError as e:
                if self._stopping:
                    return
                starved = self._accept_failed(e, starved)
                continue
            if starved:
                log.info("%s: accepting again", self.name)
                starved = False
            if not self.limit.acquire():
                self._reject(sock)
                continue
            if self._full:
                log.info("%s: below the connection limit again", self.name)
                self._full = False
            self._start_worker(sock, addr)

    def _accept_failed(self, error: OSError, starved: bool) -> bool:
        """Back off after a failed accept; returns whether descriptors
        ran out (logged once per episode)."""
        if error.errno in ACCEPT_EXHAUSTED:
            if not starved:
                log.warning("%s: accept failed (%s), backing off",
                            self.name, error)
            time.sleep(ACCEPT_BACKOFF)
            return True
        if error.errno in (errno.ECONNABORTED, errno.EINTR):
            return starved
        log.exception("%s: accept failed", self.name)
        time.sleep(ACCEPT_BACKOFF)
        return starved

    # Refusing

    def _reject(self, sock: socket.socket) -> None:
        """Answer 503 and close: plain sockets at once, TLS in a thread."""
        self.observer.connection_refused()
        if not self._full:
            log.warning("%s: %d connections open, the limit; refusing new "
                        "ones", self.name, self.limit.limit)
            self._full = True
        if self.tls_context is None:
            self._refuse(sock)
        elif self._rejecting.acquire(blocking=False):
            try:
                threading.Thread(target=self._refuse_tls, args=(sock,),
                                 name=f"{self.name}-refuse",
                                 daemon=True).start()
            except RuntimeError:
                self._rejecting.release()
                sock.close()
        else:
            sock.close()

    def _refuse_tls(self, sock: socket.socket) -> None:
        assert self.tls_context is not None
        try:
            sock.settimeout(REJECT_TIMEOUT)
            try:
                sock = self.tls_context.wrap_socket(sock, server_side=True)
            except (OSError, ValueError):
                sock.close()
                return
            self._refuse(sock, tls=True)
        finally:
            self._rejecting.release()

    def _refuse(self, sock: socket.socket, tls: bool = False) -> None:
        # A plain socket is answered in the accept loop: its send buffer
        # is empty, so the short answer never waits.
        conn = Connection(sock, tls=tls,
                          timeout=REJECT_TIMEOUT if tls else 0.1)
        error = ServiceUnavailable(
            f"Too many connections ({self.limit.limit}); retry in "
            f"{RETRY_AFTER} seconds", retry_after=RETRY_AFTER)
        try:
            send_error(conn, error, close=True)
            # Take in what the client already sent, so that closing does
            # not reset the connection under the answer (TCP).
            sock.setblocking(False)
            for _ in range(16):
                if not sock.recv(65536):
                    break
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    def _start_worker(self, sock: socket.socket, addr: object) -> None:
        with self._lock:
            if self._stopping:
                self.limit.release()
                sock.close()
                return
            self._next_id += 1
            conn_id = self._next_id
            thread = threading.Thread(
                target=self._serve_connection, args=(sock, addr, conn_id),
                name=f"{self.name}/{conn_id}", daemon=True)
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError:
            with self._lock:
                self._threads.discard(thread)
            self.limit.release()
            sock.close()
            log.warning("%s: cannot start a thread, connection dropped",
                        self.name)

    # Serving one connection

    def _serve_connection(self, sock: socket.socket, addr: object,
                          conn_id: int) -> None:
        conn = None
        self.observer.connection_opened()
        context = self.app.connection_opened(f"{self.name}/{conn_id}")
        client = _client_name(addr)
        try:
            conn = self._open_connection(sock)
            if conn is None:
                return
            while self._serve_request(conn, context, client):
                pass
        except Exception:
            log.exception("%s: connection %s failed", self.name, context.id)
        finally:
            try:
                self.app.connection_closed(context)
            except Exception:
                log.exception("%s: releasing connection %s failed",
                              self.name, context.id)
            with self._lock:
                if conn is not None:
                    self._connections.pop(conn, None)
                self._threads.discard(threading.current_thread())
            if conn is not None:
                conn.close()
            else:
                sock.close()
            self.observer.connection_closed()
            self.limit.release()

    def _open_connection(self, sock: socket.socket) -> Connection | None:
        """The accepted socket tuned, TLS wrapped, as a registered
        Connection; None when the handshake failed or the server stops."""
        if sock.family == socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                            UNIX_SEND_BUFFER)
        else:
            # A head and a small body sent apart must not wait for the
            # peer's delayed ACK (~40 ms a request).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = self.tls_context is not None
        if self.tls_context is not None:
            wrapped = self._handshake(self.tls_context, sock)
            if wrapped is None:
                return None
            sock = wrapped
        conn = Connection(sock, tls=tls, timeout=self.idle_timeout,
                          head_timeout=self.head_timeout)
        with self._lock:
            if self._stopping:
                conn.close()
                return None
            self._connections[conn] = False
        return conn

    def _handshake(self, tls_context: ssl.SSLContext,
                   sock: socket.socket) -> ssl.SSLSocket | None:
        """The TLS socket; None, ``sock`` closed, if the handshake failed."""
        sock.settimeout(TLS_HANDSHAKE_TIMEOUT)
        try:
            return tls_context.wrap_socket(sock, server_side=True)
        except (OSError, ValueError) as e:
            log.debug("%s: TLS handshake failed: %s", self.name, e)
            sock.close()
            return None

    def _serve_request(self, conn: Connection, context: StateT,
                       client: str) -> bool:
        """Serve one request; returns False when the connection must close."""
        idle = context.idle_timeout
        conn.set_timeout(idle if idle is not None else self.idle_timeout)
        outcome = serve_request(conn, self.app, context, client,
                                service=self.name,
                                busy=partial(self._set_busy, conn))
        if outcome is None:
            return False
        started, now = outcome.started, time.monotonic()
        elapsed = now - started if started is not None else 0.0
        self._log_request(conn, context, client, outcome, elapsed)
        self.observer.request_done(outcome.head, conn.status, outcome.record,
                                   elapsed)
        return outcome.keep and not self._stopping

    def _set_busy(self, conn: Connection, busy: bool) -> None:
        with self._lock:
            if conn in self._connections:
                self._connections[conn] = busy

    def _log_request(self, conn: Connection, context: StateT, client: str,
                     outcome: Outcome, elapsed: float) -> None:
        """The request's access line (see ``accesslog``); a head that
        could not be parsed shows as ``- -``."""
        head = outcome.head
        log.info("%s", accesslog.line(
            conn_id=context.id, client=client,
            method=head.method if head is not None else "-",
            path=head.path if head is not None else "-",
            status=conn.status, record=outcome.record,
            elapsed=elapsed, cause=outcome.cause,
            secrets=self.app.secret_paths))

    # Stopping

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let running requests finish, close the rest.

        Idle connections are closed at once; busy ones get up to
        ``timeout`` seconds to finish their current request.
        """
        with self._lock:
            self._stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        threads = self._close_idle_until(time.monotonic() + timeout)
        with self._lock:
            leftover = list(self._connections)
        for conn in leftover:
            _shutdown(conn.sock)
        for thread in threads:
            thread.join(1.0)

    def _close_idle_until(self, deadline: float) -> list[threading.Thread]:
        """Close idle connections as they become idle, until every worker
        ended or ``deadline``; returns the workers still running."""
        while True:
            with self._lock:
                idle = [c for c, busy in self._connections.items() if not busy]
                threads = list(self._threads)
            for conn in idle:
                _shutdown(conn.sock)
            if not threads or time.monotonic() >= deadline:
                return threads
            time.sleep(0.05)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _client_name(addr: object) -> str:
    if isinstance(addr, tuple) and addr:
        return f"{addr[0]}:{addr[1]}"
    return "local"
