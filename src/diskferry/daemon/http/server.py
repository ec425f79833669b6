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

Connections open at once are capped per service (``limits``): a share of
a limit the image services have together, of which remote peers cannot
take the local socket's reserve; and a cap on the connections that have
not started a request yet, past which the oldest is cut. Past its share
a new connection is answered ``503`` with ``Retry-After`` in a thread of
its own, which reads what the client sends meanwhile so that the client
reads the answer; never queued or left hanging.

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
from diskferry.daemon.http.limits import (
    DEFAULT_PENDING_LIMIT,
    PRE_REQUEST_TIMEOUT,
    ConnectionLimit,
    LimitShare,
    PendingConnections,
)
from diskferry.daemon.http.listener import describe
from diskferry.daemon.http.observer import NO_OBSERVER, ServerObserver
from diskferry.daemon.http.request import StateT
from diskferry.errors import ServiceUnavailable

log = logging.getLogger("diskferry.daemon.http")

#: Seconds a new TLS connection has to complete its handshake.
TLS_HANDSHAKE_TIMEOUT = PRE_REQUEST_TIMEOUT

#: Seconds the accept loop sleeps when out of descriptors, instead of
#: spinning or dying; connections finishing will free some.
ACCEPT_BACKOFF = 0.1

#: Send buffer of a local (UNIX) connection. A UNIX stream socket
#: queues what its sender may have in flight; the default ~200 KiB makes
#: a reader of 8 MiB requests wake up dozens of times per request.
#: Capped by net.core.wmem_max (often 208 KiB, 4 MiB on some hosts).
UNIX_SEND_BUFFER = 4 * 1024**2

ACCEPT_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

#: Seconds a client refused for lack of room is told to wait (Retry-After).
RETRY_AFTER = 2

#: Seconds a refused connection is kept, at most: for its TLS handshake,
#: and for the request it may be sending while its 503 waits, so that the
#: client reads the answer instead of a broken pipe.
REJECT_TIMEOUT = 2.0

#: Seconds of silence after which a refused client is taken to have sent
#: all it will before reading its answer.
REJECT_QUIET = 0.5

#: Bytes of a refused client's request read before closing, at most.
REJECT_DRAIN = 1024**2

#: Refused connections answered in a thread of their own at once; past
#: this a plain one is answered and closed at once, a TLS one closed.
MAX_REJECTING = 16


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
                 limit: LimitShare | None = None,
                 pending_limit: int = DEFAULT_PENDING_LIMIT,
                 observer: ServerObserver = NO_OBSERVER) -> None:
        self.name = name
        self.sock = sock
        self.app = app
        self.tls_context = tls_context
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout
        self.limit = limit if limit is not None else ConnectionLimit().share()
        self._pending = PendingConnections(pending_limit)
        self.observer = observer
        self._rejecting = threading.BoundedSemaphore(MAX_REJECTING)
        self._full = False  # logged once per episode
        self._cutting = False  # logged once per episode
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
            self._admit(sock, addr)

    def _admit(self, sock: socket.socket, addr: object) -> None:
        """Count a new connection as pending and start its worker; the
        oldest pending ones are cut past the pending cap."""
        accepted = time.monotonic()
        cut = self._pending.add(sock.fileno())
        if cut and not self._cutting:
            log.warning("%s: more than %d connections without a request; "
                        "closing the oldest", self.name, self._pending.limit)
        self._cutting = bool(cut)
        self._start_worker(sock, addr, accepted)

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
        """Answer 503 and close, in a thread of its own that waits for the
        client's request (and the TLS handshake); plain sockets at once
        when too many refusals run already."""
        self.observer.connection_refused()
        if not self._full:
            log.warning("%s: %d connections open, the limit; refusing new "
                        "ones", self.name, self.limit.limit)
            self._full = True
        if self._rejecting.acquire(blocking=False):
            try:
                threading.Thread(target=self._refuse_in_thread, args=(sock,),
                                 name=f"{self.name}-refuse",
                                 daemon=True).start()
                return
            except RuntimeError:
                self._rejecting.release()
        if self.tls_context is None:
            self._refuse(sock)
        else:
            sock.close()

    def _refuse_in_thread(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(REJECT_TIMEOUT)
            if self.tls_context is not None:
                try:
                    sock = self.tls_context.wrap_socket(sock,
                                                        server_side=True)
                except (OSError, ValueError):
                    sock.close()
                    return
            self._refuse(sock, tls=self.tls_context is not None, linger=True)
        finally:
            self._rejecting.release()

    def _refuse(self, sock: socket.socket, tls: bool = False,
                linger: bool = False) -> None:
        """Answer 503, then take in the request the client sends, so that
        closing neither resets the connection under the answer (TCP) nor
        fails the client's send with EPIPE (UNIX): with ``linger`` until
        the client is done or quiet, else what already came."""
        # Without linger this runs in the accept loop: the send buffer of
        # a new socket is empty, so the short answer never waits.
        conn = Connection(sock, tls=tls,
                          timeout=REJECT_TIMEOUT if linger else 0.1)
        error = ServiceUnavailable(
            f"Too many connections ({self.limit.limit}); retry in "
            f"{RETRY_AFTER} seconds", retry_after=RETRY_AFTER)
        try:
            send_error(conn, error, close=True)
            if linger:
                _take_in(sock, time.monotonic() + REJECT_TIMEOUT)
            else:
                sock.setblocking(False)
                for _ in range(16):
                    if not sock.recv(65536):
                        break
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    def _start_worker(self, sock: socket.socket, addr: object,
                      accepted: float) -> None:
        with self._lock:
            if self._stopping:
                self._dropped(sock)
                return
            self._next_id += 1
            conn_id = self._next_id
            thread = threading.Thread(
                target=self._serve_connection,
                args=(sock, addr, conn_id, accepted),
                name=f"{self.name}/{conn_id}", daemon=True)
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError:
            with self._lock:
                self._threads.discard(thread)
            self._dropped(sock)
            log.warning("%s: cannot start a thread, connection dropped",
                        self.name)

    def _dropped(self, sock: socket.socket) -> None:
        """Forget a connection no worker will serve."""
        self._pending.remove(sock.fileno())
        self.limit.release()
        sock.close()

    # Serving one connection

    def _serve_connection(self, sock: socket.socket, addr: object,
                          conn_id: int, accepted: float) -> None:
        fd = sock.fileno()
        conn = None
        self.observer.connection_opened()
        context = self.app.connection_opened(f"{self.name}/{conn_id}")
        client = _client_name(addr)
        try:
            sock = self._secure(_tuned(sock))
            conn = self._open_connection(sock, accepted)
            while conn is not None and self._serve_request(conn, context,
                                                           client):
                pass
        except Exception:
            log.exception("%s: connection %s failed", self.name, context.id)
        finally:
            # Before closing: the descriptor may be reused at once.
            self._pending.remove(fd)
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

    def _secure(self, sock: socket.socket) -> socket.socket:
        """``sock`` wrapped for TLS, its handshake still to come (so that
        a failed one leaves the socket for the worker to close)."""
        if self.tls_context is None:
            return sock
        return self.tls_context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False)

    def _open_connection(self, sock: socket.socket,
                         accepted: float) -> Connection | None:
        """The accepted socket, TLS handshake done, as a registered
        Connection; None when the handshake failed or the server stops.
        The handshake and the first head share the pre-request deadline."""
        if isinstance(sock, ssl.SSLSocket) and not self._handshake(sock):
            return None
        conn = Connection(sock, tls=self.tls_context is not None,
                          timeout=self.idle_timeout,
                          head_timeout=self.head_timeout,
                          first_head_timeout=PRE_REQUEST_TIMEOUT,
                          started=accepted)
        with self._lock:
            if self._stopping:
                return None
            self._connections[conn] = False
        return conn

    def _handshake(self, sock: ssl.SSLSocket) -> bool:
        """Complete the TLS handshake; False if it failed."""
        sock.settimeout(TLS_HANDSHAKE_TIMEOUT)
        try:
            sock.do_handshake()
        except (OSError, ValueError) as e:
            log.debug("%s: TLS handshake failed: %s", self.name, e)
            return False
        return True

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
        if busy:  # a request started: the connection is no longer pending
            self._pending.remove(conn.sock.fileno())
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


def _tuned(sock: socket.socket) -> socket.socket:
    if sock.family == socket.AF_UNIX:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)
    else:
        # A head and a small body sent apart must not wait for the
        # peer's delayed ACK (~40 ms a request).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _take_in(sock: socket.socket, deadline: float) -> None:
    """Read what a refused client sends until it closes, falls quiet for
    ``REJECT_QUIET`` seconds, sent ``REJECT_DRAIN`` bytes, or
    ``deadline``."""
    taken = 0
    while taken < REJECT_DRAIN:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        sock.settimeout(min(left, REJECT_QUIET))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return
        if not data:
            return
        taken += len(data)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _client_name(addr: object) -> str:
    if isinstance(addr, tuple) and addr:
        return f"{addr[0]}:{addr[1]}"
    return "local"
