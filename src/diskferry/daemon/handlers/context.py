"""Per-connection image state: the backends a connection has open.

A connection that uses a ticket opens the ticket's backend once and keeps
it for its next requests; the ticket counts the connection while it does.
Closing the connection, or canceling the ticket, releases the backend.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from diskferry.daemon.backends import open_backend
from diskferry.daemon.backends.base import Backend
from diskferry.daemon.buffers import POOL, SMALL_BUFFER, SMALL_POOL, BufferPool
from diskferry.daemon.config import Config
from diskferry.daemon.http.request import AccessRecord, Request
from diskferry.daemon.tickets import Ticket, TicketStore
from diskferry.errors import BackendError, ExportFailed, ServerError
from diskferry.pipe import Pipe


class OpenImage:
    """A ticket's backend as one connection uses it."""

    def __init__(self, ticket: Ticket, backend: Backend) -> None:
        self.ticket = ticket
        self.backend = backend
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.backend.close()


@dataclass
class ConnectionContext:
    """What a connection holds across its requests (``images``, the
    ticket's ``idle_timeout``) and during one (``buffer``, ``pipe``)."""

    id: str
    idle_timeout: float | None = None
    images: dict[str, OpenImage] = field(default_factory=dict)
    buffer: mmap.mmap | None = None
    #: Where ``buffer`` goes back to.
    buffer_pool: BufferPool = POOL
    pipe: Pipe | None = None


#: A request of the images and tickets APIs, as the server makes it.
HandlerRequest: TypeAlias = Request[ConnectionContext]


class ImageRequest(Protocol):
    """What the functions here use of a request: its connection's state
    and its access record."""

    @property
    def context(self) -> ConnectionContext: ...

    @property
    def log(self) -> AccessRecord: ...


def authorize(request: ImageRequest, store: TicketStore, ticket_id: str,
              op: str) -> Ticket:
    """The ticket if it allows ``op``, named in the request's log line;
    what a request is checked against before its image is opened."""
    ticket = store.authorize(ticket_id, op)
    request.log.transfer_id = ticket.transfer_id
    request.log.scheme = ticket.spec.url.partition(":")[0]
    return ticket


def open_image(request: ImageRequest, store: TicketStore, config: Config,
               ticket_id: str, op: str) -> OpenImage:
    """Authorize ``op`` on the ticket and return the connection's backend."""
    return ticket_image(request, authorize(request, store, ticket_id, op),
                        config)


def ticket_image(request: ImageRequest, ticket: Ticket,
                 config: Config) -> OpenImage:
    """The connection's backend of an authorized ticket.

    The first use of a ticket on a connection opens the backend and
    switches the connection to the ticket's inactivity timeout.
    """
    ticket_id = ticket.spec.uuid
    context = request.context
    image = context.images.get(ticket_id)
    if image is not None and image.ticket is ticket:
        return image
    if image is not None:  # the ticket was replaced
        _release(context.id, image)
    try:
        backend = open_backend(ticket, config)
    except BackendError as e:
        raise ServerError(f"Cannot open the image of transfer "
                          f"{ticket.transfer_id}{_open_cause(e)}") from e
    image = OpenImage(ticket, backend)
    try:
        ticket.add_connection(context.id, image.close)
    except BaseException:
        image.close()
        raise
    context.images[ticket_id] = image
    context.idle_timeout = ticket.spec.inactivity_timeout
    return image


def _open_cause(error: BackendError) -> str:
    """Why an image could not be opened, as far as the client may know:
    how the daemon's own export died, or the system's reason (": No such
    file or directory"); the image's path stays in the daemon's log."""
    if isinstance(error, ExportFailed):
        return f": {error}"
    cause = error.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return f": {cause.strerror}"
    return ""


def connection_buffer(request: ImageRequest, size: int,
                      need: int | None = None) -> mmap.mmap:
    """An aligned buffer for this request, given back when the request
    ends (``release_request``): of ``size`` bytes from the daemon's pool,
    or a small one when ``need`` (the bytes the request moves, if known)
    fits in it or the pool's buffers are all lent. Never waits: a client
    stalling with a large buffer holds up no other request."""
    context = request.context
    buf = context.buffer
    if buf is not None and len(buf) >= min(size, need or size):
        return buf
    release_request(context)
    if need is None or need > SMALL_BUFFER:
        buf = POOL.try_take(size)
        if buf is not None:
            context.buffer, context.buffer_pool = buf, POOL
            return buf
    buf = SMALL_POOL.take(SMALL_BUFFER)
    context.buffer, context.buffer_pool = buf, SMALL_POOL
    return buf


def release_request(context: ConnectionContext) -> None:
    """What a request borrowed goes back, so an idle connection holds no
    buffer."""
    buf, context.buffer = context.buffer, None
    if buf is not None:
        context.buffer_pool.give(buf)


def connection_pipe(request: ImageRequest) -> Pipe:
    """One pipe per connection for splicing request bodies to files."""
    pipe = request.context.pipe
    if pipe is None:
        pipe = request.context.pipe = Pipe()
    return pipe


@contextlib.contextmanager
def request_pipes(count: int = 1) -> Iterator[list[Pipe]]:
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


def discard_pipe(context: ConnectionContext) -> None:
    """Close the connection's pipe; the next splice gets a new one."""
    pipe, context.pipe = context.pipe, None
    if pipe is not None:
        pipe.close()


def _release(conn_id: str, image: OpenImage) -> None:
    image.ticket.remove_connection(conn_id)
    image.close()


def release_connection(context: ConnectionContext) -> None:
    images, context.images = context.images, {}
    for image in images.values():
        _release(context.id, image)
    discard_pipe(context)
    release_request(context)
