"""``/images/{ticket}``: OPTIONS, GET, PUT and PATCH.

The data path: on plain sockets (UNIX, TCP) GET sends file ranges with
``sendfile`` and PUT splices the body from the socket into the file;
an NBD backend splices between its socket and the client's through
pipes; with TLS or O_DIRECT both go through the connection's aligned
buffer. The backend's side of a copy overlaps the connection's
(``overlap``).
Each request checks between chunks whether its ticket was canceled.
"""

import urllib.parse

from diskferry.daemon.handlers import overlap
from diskferry.daemon.handlers.context import (
    connection_buffer,
    connection_pipe,
    discard_pipe,
    open_image,
    request_pipe,
)
from diskferry.daemon.handlers.jsonbody import field, read_json, send_json
from diskferry.daemon.http import parse
from diskferry.errors import BadRequest, RangeNotSatisfiable

BASE_FEATURES = ["checksum", "extents"]
WRITE_FEATURES = BASE_FEATURES + ["flush", "zero"]

#: Bytes sent per sendfile call between cancellation checks.
SENDFILE_CHUNK = 64 * 1024**2


def check_range(ticket, offset, length):
    if offset + length > ticket.size:
        raise RangeNotSatisfiable(
            f"Range {offset}-{offset + length - 1} is outside the image "
            f"(size {ticket.size})", size=ticket.size)


def content_disposition(filename):
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

    def __init__(self, store, config, server_options, ticket_options):
        self.store = store
        self.config = config
        self.server_options = server_options
        self.ticket_options = ticket_options

    def options(self, request, ticket_id):
        body = dict(self.server_options)
        if ticket_id == "*":
            allow = "OPTIONS,GET,PUT,PATCH"
            body["features"] = WRITE_FEATURES
        else:
            image = open_image(request, self.store, self.config, ticket_id,
                               "read")
            ticket = image.ticket
            with ticket.operation():
                pass  # counts as activity: extends the ticket
            if ticket.may("write"):
                allow = "OPTIONS,GET,PUT,PATCH"
                body["features"] = WRITE_FEATURES
            else:
                allow = "OPTIONS,GET"
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

    def get(self, request, ticket_id):
        image = open_image(request, self.store, self.config, ticket_id, "read")
        ticket = image.ticket
        range_header = request.headers.get("range")
        if range_header is not None:
            offset, length = parse.parse_range(range_header, ticket.size)
            status = 206
            headers = {"Content-Range":
                       f"bytes {offset}-{offset + length - 1}/{ticket.size}"}
        else:
            offset, length, status, headers = 0, ticket.size, 200, {}
        available = image.backend.size()
        if offset + length > available:
            if range_header is None:
                # As ovirt-imageio: the whole image is what the storage has.
                length = available
            else:
                raise RangeNotSatisfiable(
                    f"Requested more bytes than available: "
                    f"{offset + length} > {available}", size=available)
        headers["Content-Type"] = "application/octet-stream"
        headers["Content-Disposition"] = content_disposition(
            ticket.spec.filename)
        request.log.update(offset=offset, size=length)
        conn = request.conn
        backend = image.backend
        with ticket.operation(offset) as op:
            conn.start_response(status, length, headers)
            fd = backend.fileno() if conn.zero_copy else None
            if fd is not None:
                self._send_file(conn, fd, op, offset, length)
            elif overlap.splices(conn, backend, length):
                with request_pipe() as pipe:
                    overlap.send_spliced(conn, backend, pipe, op, offset,
                                         length)
            else:
                self._send_buffered(request, backend, op, offset, length)

    def _send_file(self, conn, fd, op, offset, length):
        end = offset + length
        while offset < end:
            op.check()
            n = min(SENDFILE_CHUNK, end - offset)
            conn.sendfile(fd, offset, n)
            offset += n
            op.done += n

    def _send_buffered(self, request, backend, op, offset, length):
        buf = connection_buffer(request, backend.buffer_size)
        with memoryview(buf) as view:
            overlap.send(request.conn, backend, view, op, offset, length)

    def put(self, request, ticket_id):
        image = open_image(request, self.store, self.config, ticket_id,
                           "write")
        ticket = image.ticket
        length = request.head.content_length
        if length is None:
            raise BadRequest("Content-Length header is required",
                             close_connection=True)
        content_range = request.headers.get("content-range")
        offset = parse.parse_content_range(content_range) if content_range \
            else 0
        flush = parse.query_bool(request.query, "flush", True)
        check_range(ticket, offset, length)
        request.log.update(offset=offset, size=length)
        conn = request.conn
        backend = image.backend
        fd = backend.fileno() if conn.zero_copy else None
        with ticket.operation(offset) as op:
            if fd is not None:
                self._splice_to_file(request, backend, fd, op, offset,
                                     length)
            elif overlap.splices(conn, backend, length):
                with request_pipe() as pipe:
                    overlap.receive_spliced(conn, backend, pipe, op, offset,
                                            length)
            else:
                self._receive_buffered(request, backend, op, offset, length)
            if flush:
                backend.flush()
        conn.send_response(200)

    def _splice_to_file(self, request, backend, fd, op, offset, length):
        chunk = backend.buffer_size
        pipe = connection_pipe(request)
        try:
            pos, end = offset, offset + length
            while pos < end:
                op.check()
                n = request.conn.splice_body(fd, pos, min(chunk, end - pos),
                                             pipe)
                pos += n
                op.done += n
        except BaseException:
            # The pipe may hold bytes of this body: never reuse it.
            discard_pipe(request.context)
            raise

    def _receive_buffered(self, request, backend, op, offset, length):
        buf = connection_buffer(request, backend.buffer_size)
        with memoryview(buf) as view:
            overlap.receive(request.conn, backend, view, op, offset, length)

    def patch(self, request, ticket_id):
        image = open_image(request, self.store, self.config, ticket_id,
                           "write")
        ticket = image.ticket
        msg = read_json(request)
        if not isinstance(msg, dict):
            raise BadRequest("PATCH body must be a JSON object")
        op_name = msg.get("op")
        if op_name == "zero":
            size = field(msg, "size", int, required=True, minimum=0)
            offset = field(msg, "offset", int, default=0, minimum=0)
            flush = field(msg, "flush", bool, default=False)
            check_range(ticket, offset, size)
            request.log.update(offset=offset, size=size)
            with ticket.operation(offset) as op:
                image.backend.zero(offset, size, punch_hole=ticket.spec.sparse)
                op.done = size
                if flush:
                    image.backend.flush()
        elif op_name == "flush":
            with ticket.operation():
                image.backend.flush()
        else:
            raise BadRequest(f"Invalid field 'op': {op_name!r:.40}; "
                             f"expected 'zero' or 'flush'")
        request.conn.send_response(200)


class NoTicketHandler:
    """``/images/`` without a ticket id."""

    def options(self, request):
        raise BadRequest("Ticket id is required")

    get = put = patch = options
