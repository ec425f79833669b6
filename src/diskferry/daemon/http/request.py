"""What a handler is given: one request, its connection, its connection's
state, and the record the access log writes about it.

The server knows two things of the state an application keeps per
connection (``ConnectionState``): a name for the logs, and how long the
connection may stay idle; the rest (open images, buffers) is the
application's own, typed by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from diskferry.daemon.http.connection import Connection
from diskferry.daemon.http.parse import RequestHead


class ConnectionState(Protocol):
    """What the server reads of an application's per-connection state."""

    @property
    def id(self) -> str:
        """The connection's name in logs: ``service/number``."""

    @property
    def idle_timeout(self) -> float | None:
        """Seconds the connection may wait for its next request; None
        keeps the server's default."""


StateT = TypeVar("StateT", bound=ConnectionState)


@dataclass
class AccessRecord:
    """What a handler tells the access log (and the metrics) about its
    request: the transfer it served, where, and how many bytes it moved
    or was asked to move."""

    transfer_id: str | None = None
    offset: int | None = None
    size: int | None = None
    #: The scheme of the ticket's URL: which kind of storage served it.
    scheme: str | None = None


@dataclass
class Request(Generic[StateT]):
    """One request as handlers see it.

    ``context`` lives as long as the connection (handlers keep open
    backends there); ``log`` collects fields for the access log line.
    """

    head: RequestHead
    conn: Connection
    context: StateT
    client: str
    log: AccessRecord = field(default_factory=AccessRecord)

    @property
    def method(self) -> str:
        return self.head.method

    @property
    def path(self) -> str:
        return self.head.path

    @property
    def query(self) -> dict[str, str]:
        return self.head.query

    @property
    def headers(self) -> dict[str, str]:
        return self.head.headers
