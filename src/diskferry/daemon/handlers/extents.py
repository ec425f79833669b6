"""``/images/{ticket}/extents``: which parts of the image hold data.

Answers the whole image by default, as ovirt-imageio does; ``start`` and
``length`` (an extension) limit the answer so that a client of a huge
image can walk it in parts. The zero context comes from every backend;
the dirty context (incremental backup) only from a ticket with
``"dirty": true`` whose backend keeps a dirty bitmap, else 404.
"""

from diskferry.daemon.backends.base import Backend
from diskferry.daemon.config import Config
from diskferry.daemon.handlers.context import authorize, ticket_image
from diskferry.daemon.handlers.jsonbody import send_json
from diskferry.daemon.handlers.request import Request
from diskferry.daemon.http import parse
from diskferry.daemon.tickets import Ticket, TicketStore
from diskferry.errors import (
    BadRequest,
    NotAvailable,
    NotFound,
    RangeNotSatisfiable,
)
from diskferry.extent import Extent, merged

CONTEXTS = ("zero", "dirty")


def covering(extents: list[Extent], start: int, length: int) -> list[Extent]:
    """Backend extents of a range, padded past the image's end.

    An image shorter than its ticket reads as zeros there, unallocated
    and never dirty.
    """
    covered = extents[-1].end if extents else start
    if covered < start + length:
        extents.append(Extent(covered, start + length - covered, zero=True,
                              hole=True))
    return merged(extents)


def zero_extents(backend: Backend, start: int, length: int) -> list[Extent]:
    return covering(backend.extents(start, length), start, length)


def dirty_extents(backend: Backend, start: int, length: int) -> list[Extent]:
    return covering(backend.dirty_extents(start, length), start, length)


class ExtentsHandler:

    def __init__(self, store: TicketStore, config: Config) -> None:
        self.store = store
        self.config = config

    def get(self, request: Request, ticket_id: str) -> None:
        query = request.query
        context = query.get("context", "zero")
        if context not in CONTEXTS:
            raise BadRequest(f"Invalid 'context' query parameter: "
                             f"{context!r:.40}; expected zero or dirty")
        start = parse.query_int(query, "start")
        length = parse.query_int(query, "length")
        ticket = authorize(request, self.store, ticket_id, "read")
        if context == "dirty" and not ticket.spec.dirty:
            raise _no_dirty_extents(ticket)
        start, length = _range(start, length, ticket.size)
        image = ticket_image(request, ticket, self.config)
        with ticket.operation():
            if context == "zero":
                extents = zero_extents(image.backend, start, length)
                send_json(request, [
                    {"start": e.start, "length": e.length, "zero": e.zero,
                     "hole": e.hole} for e in extents])
                return
            try:
                extents = dirty_extents(image.backend, start, length)
            except NotAvailable as e:
                raise _no_dirty_extents(ticket) from e
        send_json(request, [
            {"start": e.start, "length": e.length, "dirty": e.dirty,
             "zero": e.zero} for e in extents])


def _range(start: int | None, length: int | None,
           size: int) -> tuple[int, int]:
    """The query's ``start`` and ``length`` in an image of ``size``: the
    whole image by default."""
    if start is None:
        start = 0
    if length is None:
        length = size - start
    if start + length > size or (start >= size and size):
        raise RangeNotSatisfiable(
            f"Range {start}+{length} is outside the image (size "
            f"{size})", size=size)
    return start, length


def _no_dirty_extents(ticket: Ticket) -> NotFound:
    return NotFound(f"Dirty extents are not available for transfer "
                    f"{ticket.transfer_id}")
