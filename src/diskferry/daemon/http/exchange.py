"""One request and its answer on a connection, apart from any listener.

    conn.read_request()        head read, parsed, body framed
      RequestError             answered, connection closes
    app.handle(request)        the application answers
      RequestError             answered; the connection goes on only if
                               the client keeps it and its body could
                               be drained (``MAX_DISCARDED_BODY``, or
                               the error's own bound: a failed write
                               drains before answering, even when the
                               connection closes after it)
      ConnectionGone           nothing to answer; the connection closes
      anything else            logged, answered 500 saying nothing of
                               the internals; the connection closes

Errors become answers here and only here. The server runs this in a
loop per connection and writes the access line from the ``Outcome``;
tests run it on one end of a socket pair.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from diskferry.daemon.http.accesslog import SecretPaths
from diskferry.daemon.http.connection import Connection
from diskferry.daemon.http.parse import RequestHead
from diskferry.daemon.http.request import AccessRecord, Request, StateT
from diskferry.errors import ConnectionGone, RequestError, ServerError

log = logging.getLogger("diskferry.daemon.http")

#: Largest unread body drained after a refused request to keep the
#: connection; a larger one (refused image data) closes it instead.
MAX_DISCARDED_BODY = 64 * 1024


class Application(Protocol[StateT]):
    """What a server serves: per-connection state, requests, and how its
    paths name secrets that the access log must shorten."""

    @property
    def secret_paths(self) -> SecretPaths: ...

    def connection_opened(self, conn_id: str) -> StateT:
        """The state of a new connection named ``conn_id``."""

    def handle(self, request: Request[StateT]) -> None:
        """Answer ``request``, or raise the RequestError that answers it."""

    def connection_closed(self, context: StateT) -> None:
        """Release what the connection held."""


@dataclass
class Outcome:
    """What became of one request: what the access line says of it, and
    whether the connection may serve another.

    ``head`` is None when the head could not be read or parsed;
    ``started`` is when the request began, for its duration.
    """

    head: RequestHead | None
    started: float | None
    keep: bool = False
    cause: str | None = None
    record: AccessRecord = field(default_factory=AccessRecord)


def serve_request(conn: Connection, app: Application[StateT],
                  context: StateT, client: str, *, service: str = "http",
                  busy: Callable[[bool], None] | None = None
                  ) -> Outcome | None:
    """Read one request on ``conn``, have ``app`` answer it, answer its
    error if it failed; None when the peer closed or left between
    requests (nothing to answer nor log).

    ``busy`` is told when the request starts and ends being served (the
    server closes idle connections at once when it stops).
    """
    try:
        head = conn.read_request()
    except ConnectionGone:
        return None
    except RequestError as e:
        # The head broke a limit or could not be parsed: no request.
        send_error(conn, e, close=True)
        return Outcome(None, conn.request_started, cause=e.message)
    if head is None:
        return None
    request = Request(head, conn, context, client)
    outcome = Outcome(head, time.monotonic(), record=request.log)
    if busy is not None:
        busy(True)
    try:
        outcome.keep, outcome.cause = _dispatch(app, request, service)
    finally:
        if busy is not None:
            busy(False)
    return outcome


def _dispatch(app: Application[StateT], request: Request[StateT],
              service: str) -> tuple[bool, str | None]:
    """Have the application answer; answer its error if it raised one.

    Returns whether the connection may serve another request, and the
    cause of a failure for the access log.
    """
    conn = request.conn
    try:
        app.handle(request)
        keep = conn.reusable
        if not conn.response_complete:
            raise ServerError("Handler did not complete its response")
        return keep, None
    except ConnectionGone as e:
        return False, f"connection lost: {e}"
    except RequestError as e:
        return _answer_error(conn, e), _cause(e)
    except Exception as e:
        # The traceback is the cause; the access line says which
        # request it was (a path with its secret shortened).
        log.exception("%s: %s: request failed", service, request.context.id)
        send_error(conn, ServerError("Internal server error"), close=True)
        return False, f"internal error: {type(e).__name__}"


def _answer_error(conn: Connection, error: RequestError) -> bool:
    """Answer a failed request; returns whether the connection goes on
    (the client keeps it, and its body could be drained).

    An error that bounds its own drain (a failed write) drains the body
    even when the connection closes after it, so that a client still
    sending reads the answer instead of a broken pipe.
    """
    keep = (not error.close_connection and conn.keep_alive and
            not conn.close_after)
    if keep or error.discard_limit is not None:
        keep = _discard_body(conn, error) and keep
    if not send_error(conn, error, close=not keep):
        keep = False
    return keep


def _discard_body(conn: Connection, error: RequestError) -> bool:
    """Drain what is left of the body before answering ``error``.

    A chunked body says nothing of its length up front: it is drained only
    for an error that bounds the drain itself (a failed write, whose
    client is still sending and must read the answer, not a reset);
    after other refusals the connection closes.
    """
    if conn.chunked and not conn.body_done and error.discard_limit is None:
        return False
    try:
        return conn.discard_body(error.discard_limit or MAX_DISCARDED_BODY)
    except ConnectionGone:
        return False


def send_error(conn: Connection, error: RequestError, close: bool) -> bool:
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


def _cause(error: RequestError) -> str:
    """What the access log says of a failed request: its message, and
    for a server error what the client is not told (once, here)."""
    if error.__cause__ is not None and error.status >= 500:
        return f"{error.message}: {error.__cause__}"
    return error.message
