"""The two applications the daemon serves, as routing tables.

Their paths name tickets (``/images/{id}``, ``/tickets/{id}``), and a
ticket id is a bearer secret: the applications tell the access log so
(``TICKET_PATHS``), as the server core knows no route.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from diskferry.daemon.config import Config
from diskferry.daemon.handlers.checksum import (
    AlgorithmsHandler,
    ChecksumHandler,
)
from diskferry.daemon.handlers.context import (
    ConnectionContext,
    HandlerRequest,
    release_connection,
    release_request,
)
from diskferry.daemon.handlers.extents import ExtentsHandler
from diskferry.daemon.handlers.images import (
    ImageHandler,
    NoTicketHandler,
    NoTicketReadHandler,
)
from diskferry.daemon.handlers.info import InfoHandler
from diskferry.daemon.handlers.metrics import MetricsHandler, MetricsSource
from diskferry.daemon.handlers.tickets import TicketsHandler
from diskferry.daemon.http import parse
from diskferry.daemon.http.accesslog import SecretPaths
from diskferry.daemon.http.router import Router
from diskferry.errors import BackendError, request_error

if TYPE_CHECKING:
    from diskferry.daemon.tickets import TicketStore

TICKET = r"/images/([^/]+)"


def default_transfer_id(ticket_id: str) -> str:
    """The transfer id of a ticket that has none: its id's first 18
    characters, as ovirt-imageio names it; too much of a secret for a
    log."""
    return f"(ticket/{ticket_id[:18]})"


#: Paths whose segment after these prefixes is a ticket id, on either
#: service; messages also name a ticket by its default transfer id.
TICKET_PATHS = SecretPaths(("/images/", "/tickets/"), default_transfer_id)


class App:
    """What the HTTP server calls: dispatch a request, release a connection.

    ``close_query``: a request whose query has ``close=y`` is answered,
    whatever the answer, and then its connection is closed (the images
    API: ovirt-imageio's clients ask for it so).
    """

    secret_paths = TICKET_PATHS

    def __init__(self, routes: Iterable[tuple[str, object]],
                 close_query: bool = False) -> None:
        self._router = Router(routes)
        self._close_query = close_query

    def connection_opened(self, conn_id: str) -> ConnectionContext:
        return ConnectionContext(conn_id)

    def handle(self, request: HandlerRequest) -> None:
        if self._close_query:
            request.conn.close_after = parse.query_close(request.query)
        try:
            self._router.dispatch(request)
        except BackendError as e:
            raise request_error(e) from e
        finally:
            release_request(request.context)

    def connection_closed(self, context: ConnectionContext) -> None:
        release_connection(context)


def images_app(store: TicketStore, config: Config, options: dict[str, Any],
               ticket_options: dict[str, Any]) -> App:
    """The images API. ``options`` holds what OPTIONS advertises, and
    ``ticket_options`` what it adds for a valid ticket only."""
    return App([
        (TICKET + "/extents", ExtentsHandler(store, config)),
        # The algorithms need no ticket; an empty id is no mistake there.
        (r"/images/([^/]*)/checksum/algorithms", AlgorithmsHandler()),
        (TICKET + "/checksum", ChecksumHandler(store, config)),
        (TICKET, ImageHandler(store, config, options, ticket_options)),
        (r"/images/?", NoTicketHandler()),
        (r"/images//(?:extents|checksum)", NoTicketReadHandler()),
        (r"/info/?", InfoHandler(cors=True)),
    ], close_query=True)


def control_app(store: TicketStore,
                metrics: MetricsSource | None = None,
                backups: Sequence[tuple[str, object]] = ()) -> App:
    """The tickets API, the daemon's ``metrics`` and the routes of
    ``backups`` when given."""
    routes: list[tuple[str, object]] = [
        (r"/tickets/([^/]*)", TicketsHandler(store)),
        (r"/info/?", InfoHandler()),
    ]
    routes.extend(backups)
    if metrics is not None:
        routes.append((r"/metrics", MetricsHandler(metrics)))
    return App(routes)


def metrics_app(metrics: MetricsSource) -> App:
    """The daemon's metrics alone, for a port of their own."""
    return App([(r"/metrics", MetricsHandler(metrics))])
