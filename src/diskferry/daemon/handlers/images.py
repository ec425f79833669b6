"""``/images/{ticket}``: OPTIONS, GET, HEAD, PUT and PATCH.

This module speaks HTTP: ranges, statuses, headers, flush. How a range's
bytes move between the connection and the backend is ``datapath``'s
choice. Each request checks between chunks whether its ticket was
canceled.

A request is checked in three steps, each before what the next needs:
what it says by itself (a PUT's head: ``PutRequest``, a PATCH's body:
``PatchRequest``), then against its ticket (authorization, the range
against the ticket's size), and only then is the image opened. So a
malformed request is a 400 whatever the state of its storage, never the
500 that tells a client to resend its data.

HEAD answers what GET would, without the body, so that generic HTTP
clients (qemu's curl driver, nbdkit-curl-plugin, resuming downloaders)
learn the size and that ranges work. A chunked PUT (no length up front)
goes through the buffer; a PUT with a length keeps the zero-copy paths.
"""

import contextlib
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from diskferry.daemon.backends.base import Backend
from diskferry.daemon.config import Config
from diskferry.daemon.handlers import cors, datapath
from diskferry.daemon.handlers.context import (
    OpenImage,
    authorize,
    connection_buffer,
    open_image,
    ticket_image,
)
from diskferry.daemon.handlers.jsonbody import field, read_json, send_json
from diskferry.daemon.handlers.overlap import Operation
from diskferry.daemon.handlers.request import Connection, Request
from diskferry.daemon.http import parse
from diskferry.daemon.tickets import Ticket, TicketStore
from diskferry.errors import BadRequest, RangeNotSatisfiable, storage_error

BASE_FEATURES = ["checksum", "extents"]
WRITE_FEATURES = BASE_FEATURES + ["flush", "zero"]

#: What OPTIONS answers in ``Allow``: HEAD wherever GET is.
READ_METHODS = "OPTIONS,GET,HEAD"
WRITE_METHODS = READ_METHODS + ",PUT,PATCH"


def check_range(ticket: Ticket, offset: int, length: int) -> None:
    if offset + length > ticket.size:
        raise RangeNotSatisfiable(
            f"Range {offset}-{offset + length - 1} is outside the image "
            f"(size {ticket.size})", size=ticket.size)


def content_disposition(filename: str | None) -> str:
    """``attachment``, with the ticket's file name when it has one.

    A name that is not plain ASCII also goes in ``filename*`` (RFC 6266);
    quotes and control characters cannot break the header.
    """
    if not filename:
        return "attachment"
    printable = "".join(c for c in filename if c.isprintable())
    ascii_name = "".join(c if c.isascii() else "_" for c in printable)
    quoted = ascii_name.replace("\\", "\\\\").replace('"', '\\"')
    value = f'attachment; filename="{quoted}"'
    if ascii_name != printable:
        value += "; filename*=UTF-8''" + urllib.parse.quote(printable)
    return value


class ImageHandler:

    def __init__(self, store: TicketStore, config: Config,
                 server_options: Mapping[str, Any],
                 ticket_options: Mapping[str, Any]) -> None:
        self.store = store
        self.config = config
        self.server_options = server_options
        self.ticket_options = ticket_options

    def options(self, request: Request, ticket_id: str) -> None:
        cors.allow(request, preflight=True)
        body = dict(self.server_options)
        if ticket_id == "*":
            allow = WRITE_METHODS
            body["features"] = WRITE_FEATURES
        else:
            image = open_image(request, self.store, self.config, ticket_id,
                               "read")
            ticket = image.ticket
            with ticket.operation():
                pass  # counts as activity: extends the ticket
            # Writes need the ticket's leave and the storage's.
            if ticket.may("write") and image.backend.writable:
                allow = WRITE_METHODS
                body["features"] = WRITE_FEATURES
            else:
                allow = READ_METHODS
                body["features"] = BASE_FEATURES
            # What the storage cannot do is never advertised (a proxy's
            # upstream server may lack some features).
            body["features"] = [f for f in body["features"]
                                if f in image.backend.features]
            body.update(self.ticket_options)
            cap = self.config.daemon.max_connections
            body["max_readers"] = min(image.backend.max_readers, cap)
            body["max_writers"] = min(image.backend.max_writers, cap)
        send_json(request, body, headers={"Allow": allow})

    def get(self, request: Request, ticket_id: str) -> None:
        cors.allow(request)
        ticket = authorize(request, self.store, ticket_id, "read")
        range_header = request.headers.get("range")
        span = None
        if range_header is not None:
            span = parse.parse_range(range_header, ticket.size)
        image = ticket_image(request, ticket, self.config)
        if span is not None:
            offset, length = span
            status = 206
            headers = {"Content-Range":
                       f"bytes {offset}-{offset + length - 1}/{ticket.size}"}
            available = image.backend.size()
            if offset + length > available:
                raise RangeNotSatisfiable(
                    f"Requested more bytes than available: "
                    f"{offset + length} > {available}", size=available)
        else:
            offset, length, status = 0, _whole_length(image), 200
            headers = {}
        headers.update(_entity_headers(ticket))
        request.log.offset, request.log.size = offset, length
        conn = request.conn
        backend = image.backend
        with ticket.operation(offset) as op:
            conn.start_response(status, length, headers)
            datapath.send(request, backend, op, offset, length)

    def head(self, request: Request, ticket_id: str) -> None:
        """GET's answer without its body: the whole image's length."""
        cors.allow(request)
        image = open_image(request, self.store, self.config, ticket_id, "read")
        with image.ticket.operation():
            pass  # counts as activity: extends the ticket
        request.conn.send_head(200, _whole_length(image),
                               _entity_headers(image.ticket))

    def put(self, request: Request, ticket_id: str) -> None:
        cors.allow(request)
        wanted = PutRequest.of(request)
        ticket = authorize(request, self.store, ticket_id, "write")
        length = wanted.length_in(ticket)
        check_range(ticket, wanted.offset, length)
        image = ticket_image(request, ticket, self.config)
        if wanted.length is None:
            self._put_chunked(request, image, wanted, length)
            return
        offset = wanted.offset
        request.log.offset, request.log.size = offset, length
        conn = request.conn
        backend = image.backend
        with ticket.operation(offset) as op, _writing("Writing the image"):
            datapath.receive(request, backend, op, offset, length)
            if wanted.flush:
                backend.flush()
        conn.send_response(200)

    def _put_chunked(self, request: Request, image: OpenImage,
                     wanted: "PutRequest", limit: int) -> None:
        """A chunked body: it may fill its range, or the image's rest."""
        offset, span = wanted.offset, wanted.span
        request.log.offset = offset
        with image.ticket.operation(offset) as op, \
                _writing("Writing the image"):
            done = self._receive_chunked(request, image.backend, op,
                                         offset, limit)
            request.log.size = done
            if span is not None and done != span.length:
                raise BadRequest(
                    f"Chunked body of {done} bytes, Content-Range "
                    f"{request.headers['content-range'][:60]!r} needs "
                    f"{span.length}",
                    close_connection=True)
            if wanted.flush:
                image.backend.flush()
        request.conn.send_response(200)

    def _receive_chunked(self, request: Request, backend: Backend,
                         op: Operation, offset: int, limit: int) -> int:
        """Write a chunked body at ``offset``; its length, at most ``limit``.

        Each buffer is written only once it is known to fit: a body longer
        than ``limit`` is refused before any byte past the range is
        written, and a body cut short raises ConnectionGone (no answer).
        """
        buf = connection_buffer(request, backend.buffer_size)
        conn = request.conn
        pos = offset
        with memoryview(buf) as view:
            while True:
                op.check()
                n = _fill(conn, view)
                if n == 0:
                    return pos - offset
                if pos + n > offset + limit:
                    raise BadRequest(
                        f"Chunked body longer than its range ({limit} bytes)",
                        close_connection=True)
                backend.write(view[:n], pos)
                pos += n
                op.done += n

    def patch(self, request: Request, ticket_id: str) -> None:
        # No CORS here: ovirt-imageio 2.5.1 answers PATCH without it.
        wanted = PatchRequest.of(request)
        ticket = authorize(request, self.store, ticket_id, "write")
        if wanted.op == "zero":
            check_range(ticket, wanted.offset, wanted.size)
        image = ticket_image(request, ticket, self.config)
        if wanted.op == "zero":
            offset, size = wanted.offset, wanted.size
            request.log.offset, request.log.size = offset, size
            with ticket.operation(offset) as op, _writing("Zeroing"):
                image.backend.zero(offset, size, punch_hole=ticket.spec.sparse)
                op.done = size
                if wanted.flush:
                    image.backend.flush()
        else:
            with ticket.operation(), _writing("Flushing"):
                image.backend.flush()
        request.conn.send_response(200)


@dataclass(frozen=True)
class PutRequest:
    """What a PUT asks for, as its head says it: checked before the
    ticket, so that a malformed request is a 400 naming the header
    whatever the state of the ticket and its image."""

    #: None: a chunked body, its length known at its end.
    length: int | None
    span: parse.ContentRange | None
    flush: bool

    @classmethod
    def of(cls, request: Request) -> "PutRequest":
        head = request.head
        length = head.content_length
        if length is None and not head.chunked:
            raise BadRequest("Content-Length header is required",
                             close_connection=True)
        content_range = head.headers.get("content-range")
        span = None
        if content_range is not None:
            span = parse.parse_content_range(content_range)
            if length is not None and span.length != length:
                raise BadRequest(
                    f"Content-Range {content_range[:60]!r} is "
                    f"{span.length} bytes, Content-Length {length}")
        flush = parse.query_bool(request.query, "flush", True)
        return cls(length, span, flush)

    @property
    def offset(self) -> int:
        return self.span.first if self.span else 0

    def length_in(self, ticket: Ticket) -> int:
        """The bytes the body may write: its length; for a chunked body,
        its range or the image's rest."""
        if self.length is not None:
            return self.length
        return self.span.length if self.span else ticket.size - self.offset


@dataclass(frozen=True)
class PatchRequest:
    """A PATCH's JSON body, checked before the ticket as a PUT's head."""

    op: str
    offset: int = 0
    size: int = 0
    flush: bool = False

    @classmethod
    def of(cls, request: Request) -> "PatchRequest":
        msg = read_json(request)
        if not isinstance(msg, dict):
            raise BadRequest("PATCH body must be a JSON object")
        op_name = msg.get("op")
        if op_name == "zero":
            size = field(msg, "size", int, required=True, minimum=0)
            offset = field(msg, "offset", int, default=0, minimum=0)
            flush = field(msg, "flush", bool, default=False)
            return cls("zero", offset, size, flush)
        if op_name == "flush":
            return cls("flush")
        raise BadRequest(f"Invalid field 'op': {op_name!r:.40}; "
                         f"expected 'zero' or 'flush'")


def _whole_length(image: OpenImage) -> int:
    """What GET without Range sends: the ticket's size, or as ovirt-imageio
    what the storage holds when it is shorter."""
    return min(image.ticket.size, image.backend.size())


def _entity_headers(ticket: Ticket) -> dict[str, str]:
    """The headers GET and HEAD share."""
    return {
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        "Content-Disposition": content_disposition(ticket.spec.filename),
    }


def _fill(conn: Connection, view: memoryview) -> int:
    """Fill ``view`` from a chunked body; less only at its end."""
    got = 0
    while got < len(view):
        n = conn.readinto(view[got:])
        if n == 0:
            break
        got += n
    return got


class NoTicketHandler:
    """``/images/`` without a ticket id."""

    def options(self, request: Request) -> None:
        cors.allow(request, preflight=request.method == "OPTIONS")
        raise BadRequest("Ticket id is required")

    get = put = patch = options


class NoTicketReadHandler:
    """``/images//extents`` and ``/images//checksum``: an empty ticket id
    is the client's mistake, a 400 as on ``/images/``, not a 404."""

    def get(self, request: Request) -> None:
        raise BadRequest("Ticket id is required")


@contextlib.contextmanager
def _writing(what: str) -> Iterator[None]:
    """Storage errors of a write as the client should read them (507 for
    a full disk), after the rest of the body is drained."""
    try:
        yield
    except OSError as e:
        raise storage_error(e, what) from e
