"""``/metrics``: the daemon's metrics, for Prometheus to scrape."""

from __future__ import annotations

from typing import Protocol

from diskferry.daemon.handlers.context import HandlerRequest
from diskferry.daemon.metrics.exposition import CONTENT_TYPE


class MetricsSource(Protocol):
    def render(self) -> bytes:
        """The exposition text of every family."""


class MetricsHandler:
    """Answers GET (and HEAD) with the text format, never cached."""

    def __init__(self, metrics: MetricsSource) -> None:
        self.metrics = metrics

    def get(self, request: HandlerRequest) -> None:
        request.conn.send_response(200, self.metrics.render(),
                                   content_type=CONTENT_TYPE,
                                   headers={"Cache-Control": "no-store"})

    head = get
