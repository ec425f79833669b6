"""What a server tells whoever watches it, once per connection or request.

The server core counts nothing itself: it calls a ``ServerObserver``
(the daemon's metrics) at each event, and by default ``NO_OBSERVER``,
which does nothing. Calls happen in the connection's thread, after the
request was answered, never per chunk of data.
"""

from __future__ import annotations

from typing import Protocol

from diskferry.daemon.http.parse import RequestHead
from diskferry.daemon.http.request import AccessRecord


class ServerObserver(Protocol):
    """Events of one service."""

    def connection_opened(self) -> None:
        """A connection was accepted and is being served."""

    def connection_closed(self) -> None:
        """A connection counted by ``connection_opened`` ended."""

    def connection_refused(self) -> None:
        """A connection was answered 503 (the connection cap) and closed."""

    def request_done(self, head: RequestHead | None, status: int | None,
                     record: AccessRecord, seconds: float) -> None:
        """A request was answered with ``status`` (None: not answered)
        after ``seconds``; ``head`` is None when it could not be parsed."""


class NoObserver:
    """Watches nothing."""

    def connection_opened(self) -> None:
        pass

    def connection_closed(self) -> None:
        pass

    def connection_refused(self) -> None:
        pass

    def request_done(self, head: RequestHead | None, status: int | None,
                     record: AccessRecord, seconds: float) -> None:
        pass


NO_OBSERVER = NoObserver()
