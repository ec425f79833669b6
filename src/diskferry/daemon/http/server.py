"""A threaded HTTP/1.1 server: one accept thread, one thread per connection.

    listening socket --accept--> worker thread
                                   TLS handshake (bounded by a timeout)
                                   loop: read head -> app.handle(request)
                                         -> access log line
                                   app.connection_closed(context)

Blocking I/O in threads is enough here: a server moves bulk data over a
few dozen connections, and every syscall releases the GIL.

Connections open at once are capped (``ConnectionLimit``, shared by the
services that serve clients): past the cap a new connection is answered
``503`` with ``Retry-After`` and closed, never queued or left hanging.

Error handling is in one place, ``_serve_request``: a ``RequestError``
becomes its status and a text body; ``ConnectionGone`` closes the
connection silently; anything else is logged and answered with a 500
whose body says nothing of the internals.
"""

import errno
import logging
import socket
import threading
import time

from diskferry.daemon.http import accesslog, parse
from diskferry.daemon.http.connection import HEAD_TIMEOUT, Connection
from diskferry.daemon.http.listener import describe
from diskferry.errors import (
    ConnectionGone,
    RequestError,
    ServerError,
    ServiceUnavailable,
)

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

#: Largest unread body drained after a refused request to keep the
#: connection; a larger one (refused image data) closes it instead.
MAX_DISCARDED_BODY = 64 * 1024

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

    def __init__(self, limit=DEFAULT_CONNECTION_LIMIT):
        self.limit = limit
        self._lock = threading.Lock()
        self.count = 0

    def acquire(self):
        """Count one more connection; False, counting none, when full."""
        with self._lock:
            if self.count >= self.limit:
                return False
            self.count += 1
            return True

    def release(self):
        with self._lock:
            self.count -= 1


class Request:
    """One request: its parsed head, its connection and per-connection state.

    ``context`` lives as long as the connection (handlers keep open
    backends there); ``log`` collects fields for the access log line.
    """

    def __init__(self, head, conn, context, client):
        self.head = head
        self.conn = conn
        self.context = context
        self.client = client
        self.log = {}

    @property
    def method(self):
        return self.head.method

    @property
    def path(self):
        return self.head.path

    @property
    def query(self):
        return self.head.query

    @property
    def headers(self):
        return self.head.headers


class _Connection(Connection):
    """A Connection that remembers the status it answered, for the log."""

    status = None

    def start_response(self, status, *args, **kwargs):
        self.status = status
        return super().start_response(status, *args, **kwargs)


class Server:
    """Serves ``app`` on one listening socket until ``stop()``.

    ``app`` has ``handle(request)`` and ``connection_closed(context)``.
    ``tls_context``, when given, wraps every accepted socket.
    """

    def __init__(self, name, sock, app, *, tls_context=None,
                 idle_timeout=60.0, head_timeout=HEAD_TIMEOUT, limit=None):
        self.name = name
        self.sock = sock
        self.app = app
        self.tls_context = tls_context
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout
        self.limit = limit if limit is not None else ConnectionLimit()
        self._rejecting = threading.BoundedSemaphore(MAX_REJECTING)
        self._full = False  # logged once per episode
        self.address = describe(sock)
        self._lock = threading.Lock()
        self._connections = {}  # Connection -> busy (bool)
        self._threads = set()
        self._stopping = False
        self._accept_thread = None
        self._next_id = 0

    def start(self):
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"{self.name}-accept", daemon=True)
        self._accept_thread.start()

    # Accepting

    def _accept_loop(self):
        starved = False  # logged once per episode, not 10 times a second
        while not self._stopping:
            try:
                sock, addr = self.sock.accept()
            except OSError as e:
                if self._stopping:
                    return
                if e.errno in ACCEPT_EXHAUSTED:
                    if not starved:
                        log.warning("%s: accept failed (%s), backing off",
                                    self.name, e)
                        starved = True
                    time.sleep(ACCEPT_BACKOFF)
                    continue
                if e.errno in (errno.ECONNABORTED, errno.EINTR):
                    continue
                log.exception("%s: accept failed", self.name)
                time.sleep(ACCEPT_BACKOFF)
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

    # Refusing

    def _reject(self, sock):
        """Answer 503 and close: plain sockets at once, TLS in a thread."""
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

    def _refuse_tls(self, sock):
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

    def _refuse(self, sock, tls=False):
        # A plain socket is answered in the accept loop: its send buffer
        # is empty, so the short answer never waits.
        conn = Connection(sock, tls=tls,
                          timeout=REJECT_TIMEOUT if tls else 0.1)
        error = ServiceUnavailable(
            f"Too many connections ({self.limit.limit}); retry in "
            f"{RETRY_AFTER} seconds", retry_after=RETRY_AFTER)
        try:
            self._send_error(conn, error, close=True)
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

    def _start_worker(self, sock, addr):
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

    def _serve_connection(self, sock, addr, conn_id):
        conn = None
        context = {"id": f"{self.name}/{conn_id}"}
        client = _client_name(addr)
        try:
            if sock.family == socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                UNIX_SEND_BUFFER)
            else:
                # A head and a small body sent apart must not wait for the
                # peer's delayed ACK (~40 ms a request).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls_context is not None:
                sock = self._handshake(sock)  # closes it on failure
                if sock is None:
                    return
            conn = _Connection(sock, tls=self.tls_context is not None,
                               timeout=self.idle_timeout,
                               head_timeout=self.head_timeout)
            with self._lock:
                if self._stopping:
                    return
                self._connections[conn] = False
            while self._serve_request(conn, context, client):
                pass
        except Exception:
            log.exception("%s: connection %s failed", self.name, context["id"])
        finally:
            try:
                self.app.connection_closed(context)
            except Exception:
                log.exception("%s: releasing connection %s failed",
                              self.name, context["id"])
            with self._lock:
                if conn is not None:
                    self._connections.pop(conn, None)
                self._threads.discard(threading.current_thread())
            if conn is not None:
                conn.close()
            elif sock is not None:
                sock.close()
            self.limit.release()

    def _handshake(self, sock):
        sock.settimeout(TLS_HANDSHAKE_TIMEOUT)
        try:
            return self.tls_context.wrap_socket(sock, server_side=True)
        except (OSError, ValueError) as e:
            log.debug("%s: TLS handshake failed: %s", self.name, e)
            sock.close()
            return None

    def _serve_request(self, conn, context, client):
        """Serve one request; returns False when the connection must close."""
        conn.set_timeout(context.get("idle_timeout", self.idle_timeout))
        conn.status = None
        started = time.monotonic()
        try:
            raw = conn.read_head()
        except ConnectionGone:
            return False
        except RequestError as e:
            self._send_error(conn, e, close=True)
            self._log_request(conn, context, client, None, {}, started,
                              e.message)
            return False
        if raw is None:
            return False
        started = time.monotonic()
        self._set_busy(conn, True)
        request = None
        head = None
        keep = False
        cause = None
        try:
            head = parse.parse_head(raw)
            conn.no_body = head.method == "HEAD"
            length = head.content_length
            conn.start_body(length or 0, head.expects_continue, head.chunked)
            request = Request(head, conn, context, client)
            self.app.handle(request)
            keep = (head.keep_alive and conn.body_done and
                    not conn.close_after)
            if not conn.response_complete:
                raise ServerError("Handler did not complete its response")
        except ConnectionGone as e:
            cause = f"connection lost: {e}"
            keep = False
        except RequestError as e:
            cause = e.message
            if e.__cause__ is not None and e.status >= 500:
                # What the client is not told, the log is: once, here.
                cause = f"{cause}: {e.__cause__}"
            keep = (not e.close_connection and request is not None and
                    request.head.keep_alive and not conn.close_after and
                    self._discard_body(conn, e.discard_limit))
            if not self._send_error(conn, e, close=not keep):
                keep = False
        except Exception as e:
            # The traceback is the cause; the access line below says which
            # request it was (a path with its ticket id shortened).
            log.exception("%s: %s: request failed", self.name,
                          context["id"])
            cause = f"internal error: {type(e).__name__}"
            self._send_error(conn, ServerError("Internal server error"),
                             close=True)
            keep = False
        finally:
            self._set_busy(conn, False)
            self._log_request(conn, context, client, head,
                              request.log if request is not None else {},
                              started, cause)
        return keep and not self._stopping

    def _discard_body(self, conn, limit=None):
        try:
            return conn.discard_body(limit or MAX_DISCARDED_BODY)
        except ConnectionGone:
            return False

    def _send_error(self, conn, error, close):
        """Answer ``error`` if no response was started; False if it could not.

        ``close`` says the connection closes after it, and the answer says so.
        """
        if conn.response_started:
            return False
        headers = error.headers()
        if close:
            headers["Connection"] = "close"
        try:
            conn.send_response(error.status, error.message + "\n",
                               headers=headers)
        except ConnectionGone:
            return False
        return True

    def _set_busy(self, conn, busy):
        with self._lock:
            if conn in self._connections:
                self._connections[conn] = busy

    def _log_request(self, conn, context, client, head, fields, started,
                     cause):
        """The request's access line (see ``accesslog``); a head that
        could not be parsed shows as ``- -``."""
        log.info("%s", accesslog.line(
            conn_id=context["id"], client=client,
            method=head.method if head is not None else "-",
            path=head.path if head is not None else "-",
            status=conn.status, fields=fields,
            elapsed=time.monotonic() - started, cause=cause))

    # Stopping

    def stop(self, timeout=30.0):
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
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                idle = [c for c, busy in self._connections.items() if not busy]
                threads = list(self._threads)
            for conn in idle:
                _shutdown(conn.sock)
            if not threads or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        with self._lock:
            leftover = list(self._connections)
        for conn in leftover:
            _shutdown(conn.sock)
        for thread in threads:
            thread.join(1.0)


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _client_name(addr):
    if isinstance(addr, tuple) and addr:
        return f"{addr[0]}:{addr[1]}"
    return "local"
