"""The two applications the daemon serves, as routing tables."""

from diskferry.daemon.handlers import checksum, extents, images, info, tickets
from diskferry.daemon.handlers.context import (
    release_connection,
    release_request,
)
from diskferry.daemon.http import parse
from diskferry.daemon.http.router import Router
from diskferry.errors import BackendError, request_error

TICKET = r"/images/([^/]+)"


class App:
    """What the HTTP server calls: dispatch a request, release a connection.

    ``close_query``: a request whose query has ``close=y`` is answered,
    whatever the answer, and then its connection is closed (the images
    API: ovirt-imageio's clients ask for it so).
    """

    def __init__(self, routes, close_query=False):
        self._router = Router(routes)
        self._close_query = close_query

    def handle(self, request):
        if self._close_query:
            request.conn.close_after = parse.query_close(request.query)
        try:
            self._router.dispatch(request)
        except BackendError as e:
            raise request_error(e) from e
        finally:
            release_request(request.context)

    def connection_closed(self, context):
        release_connection(context)


def images_app(store, config, options, ticket_options):
    """The images API. ``options`` holds what OPTIONS advertises, and
    ``ticket_options`` what it adds for a valid ticket only."""
    return App([
        (TICKET + "/extents", extents.ExtentsHandler(store, config)),
        (TICKET + "/checksum/algorithms", checksum.AlgorithmsHandler()),
        (TICKET + "/checksum", checksum.ChecksumHandler(store, config)),
        (TICKET, images.ImageHandler(store, config, options,
                                           ticket_options)),
        (r"/images/?", images.NoTicketHandler()),
        (r"/info/?", info.InfoHandler(cors=True)),
    ], close_query=True)


def control_app(store):
    """The tickets API."""
    return App([
        (r"/tickets/([^/]*)", tickets.TicketsHandler(store)),
        (r"/info/?", info.InfoHandler()),
    ])
