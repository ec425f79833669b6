"""Per-connection image state: the backends a connection has open.

A connection that uses a ticket opens the ticket's backend once and keeps
it for its next requests; the ticket counts the connection while it does.
Closing the connection, or canceling the ticket, releases the backend.
"""

import contextlib
import threading

from diskferry.daemon.backends import open_backend
from diskferry.daemon.buffers import POOL
from diskferry.errors import BackendError, ServerError
from diskferry.pipe import Pipe


class OpenImage:
    """A ticket's backend as one connection uses it."""

    def __init__(self, ticket, backend):
        self.ticket = ticket
        self.backend = backend
        self._lock = threading.Lock()
        self._closed = False

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.backend.close()


def open_image(request, store, config, ticket_id, op):
    """Authorize ``op`` on the ticket and return the connection's backend.

    The first use of a ticket on a connection opens the backend and
    switches the connection to the ticket's inactivity timeout.
    """
    ticket = store.authorize(ticket_id, op)
    request.log["transfer_id"] = ticket.transfer_id
    images = request.context.setdefault("images", {})
    image = images.get(ticket_id)
    if image is not None and image.ticket is ticket:
        return image
    if image is not None:  # the ticket was replaced
        _release(request.context["id"], image)
    try:
        backend = open_backend(ticket, config)
    except BackendError as e:
        raise ServerError(f"Cannot open the image of transfer "
                          f"{ticket.transfer_id}") from e
    image = OpenImage(ticket, backend)
    try:
        ticket.add_connection(request.context["id"], image.close)
    except BaseException:
        image.close()
        raise
    images[ticket_id] = image
    request.context["idle_timeout"] = ticket.spec.inactivity_timeout
    return image


def connection_buffer(request, size):
    """An aligned buffer for this request, lent by the daemon's pool and
    given back when the request ends (``release_request``)."""
    buf = request.context.get("buffer")
    if buf is None or len(buf) < size:
        if buf is not None:
            POOL.give(request.context.pop("buffer"))
        buf = request.context["buffer"] = POOL.take(size)
    return buf


def release_request(context):
    """What a request borrowed goes back, so an idle connection holds no
    buffer."""
    buf = context.pop("buffer", None)
    if buf is not None:
        POOL.give(buf)


def connection_pipe(request):
    """One pipe per connection for splicing request bodies to files."""
    pipe = request.context.get("pipe")
    if pipe is None:
        pipe = request.context["pipe"] = Pipe()
    return pipe


@contextlib.contextmanager
def request_pipes(count=1):
    """Pipes for one spliced request, closed after it: a connection keeps
    none, so idle connections hold no pipe descriptors, and a failed
    request leaves none holding its bytes."""
    pipes = []
    try:
        for _ in range(count):
            pipes.append(Pipe())
        yield pipes
    finally:
        for pipe in pipes:
            pipe.close()


def discard_pipe(context):
    """Close the connection's pipe; the next splice gets a new one."""
    pipe = context.pop("pipe", None)
    if pipe is not None:
        pipe.close()


def _release(conn_id, image):
    image.ticket.remove_connection(conn_id)
    image.close()


def release_connection(context):
    for image in context.pop("images", {}).values():
        _release(context["id"], image)
    discard_pipe(context)
    release_request(context)
