"""The daemon's metric families: fed by its servers, read at a scrape.

Servers report connections and requests through ``ServiceMetrics`` (the
server core's ``ServerObserver``), once per event. Tickets and the
process are read when scraped, not tracked: a scrape costs a pass over
the tickets, and tickets cost nothing between scrapes.

Ticket ids are secrets and never appear: tickets are counted, and named
only by the ``transfer_id`` the management plane gave them, when
``[metrics] transfer_labels`` asks for it (one series per transfer).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from diskferry import __version__
from diskferry.daemon.http.parse import RequestHead
from diskferry.daemon.http.request import AccessRecord
from diskferry.daemon.http.router import HTTP_METHODS
from diskferry.daemon.metrics.events import BACKEND_EVENTS, BackendEvents
from diskferry.daemon.metrics.exposition import (
    Counter,
    Gauge,
    Histogram,
    Sample,
    Snapshot,
    render,
)
from diskferry.daemon.metrics.transfers import transfer_snapshots
from diskferry.daemon.tickets import TicketStore

#: Bounds of the request duration histogram, in seconds: from a cached
#: 4 KiB range to a whole image in one request.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)

#: The label of a status code, by its first digit.
STATUS_CLASSES = {n: f"{n}xx" for n in range(1, 6)}

#: Ticket URL scheme -> the backend label.
BACKEND_KINDS = {"file": "file", "nbd": "nbd", "nbd+unix": "nbd",
                 "http": "http", "https": "http"}


class _Families:
    """What servers count, shared by the daemon's services."""

    def __init__(self) -> None:
        self.connections_open = Gauge(
            "diskferry_connections_open", "Connections open, by service.",
            ("service",))
        self.connections = Counter(
            "diskferry_connections_total", "Connections accepted, by service.",
            ("service",))
        self.refused = Counter(
            "diskferry_connections_refused_total",
            "Connections answered 503 and closed: the connection cap was "
            "reached.", ("service",))
        self.requests = Counter(
            "diskferry_requests_total",
            "Requests answered, by service, method and status class.",
            ("service", "method", "code"))
        self.read = Counter(
            "diskferry_read_bytes_total",
            "Image bytes sent to clients by successful GET requests.",
            ("transport", "backend"))
        self.written = Counter(
            "diskferry_written_bytes_total",
            "Image bytes received from clients by successful PUT requests.",
            ("transport", "backend"))
        self.zeroed = Counter(
            "diskferry_zeroed_bytes_total",
            "Image bytes zeroed by successful PATCH requests.",
            ("transport", "backend"))
        self.duration = Histogram(
            "diskferry_request_duration_seconds",
            "Time from a GET or PUT request's first byte to its answer's "
            "last, by service and method.", ("service", "method"),
            DURATION_BUCKETS)

    def snapshots(self) -> list[Snapshot]:
        return [family.snapshot() for family in (
            self.connections_open, self.connections, self.refused,
            self.requests, self.read, self.written, self.zeroed,
            self.duration)]


class ServiceMetrics:
    """One service's events, as its server reports them."""

    def __init__(self, families: _Families, service: str,
                 transport: str) -> None:
        self._families = families
        self._service = service
        self._transport = transport
        self._bytes = {"GET": families.read, "PUT": families.written,
                       "PATCH": families.zeroed}

    def connection_opened(self) -> None:
        self._families.connections.inc((self._service,))
        self._families.connections_open.inc((self._service,))

    def connection_closed(self) -> None:
        self._families.connections_open.inc((self._service,), -1)

    def connection_refused(self) -> None:
        self._families.refused.inc((self._service,))

    def request_done(self, head: RequestHead | None, status: int | None,
                     record: AccessRecord, seconds: float) -> None:
        families = self._families
        method = _method_label(head)
        code = (STATUS_CLASSES.get(status // 100, "none")
                if status is not None else "none")
        families.requests.inc((self._service, method, code))
        if method == "GET" or method == "PUT":
            families.duration.observe((self._service, method), seconds)
        if code == "2xx" and record.size and record.scheme is not None:
            moved = self._bytes.get(method)
            if moved is not None:
                backend = BACKEND_KINDS.get(record.scheme, "other")
                moved.inc((self._transport, backend), record.size)


def _method_label(head: RequestHead | None) -> str:
    """A bounded label: a client may send any token as a method."""
    if head is None:
        return "none"
    return head.method if head.method in HTTP_METHODS else "other"


@dataclass(frozen=True)
class MetricsSettings:
    """What an operator chooses of the metrics (``[metrics]``)."""

    #: Name transfers by their ``transfer_id`` in per-transfer series.
    transfer_labels: bool = False


class DaemonMetrics:
    """Every family of one daemon, and the text a scrape reads."""

    def __init__(self, store: TicketStore,
                 settings: MetricsSettings = MetricsSettings(),
                 events: BackendEvents = BACKEND_EVENTS) -> None:
        self._store = store
        self._settings = settings
        self._events = events
        self._families = _Families()
        self._started = time.time()

    def service(self, name: str, transport: str) -> ServiceMetrics:
        """What the server of service ``name`` reports to; ``transport``
        is ``tls``, ``tcp`` or ``unix``."""
        return ServiceMetrics(self._families, name, transport)

    def snapshots(self) -> list[Snapshot]:
        return [*self._families.snapshots(),
                *transfer_snapshots(self._store.tickets(),
                                    self._settings.transfer_labels),
                *self._events.snapshots(),
                *self._process_snapshots()]

    def render(self) -> bytes:
        return render(self.snapshots())

    def _process_snapshots(self) -> list[Snapshot]:
        return [
            _single("diskferry_build_info", "gauge",
                    "The daemon's version; always 1.",
                    Sample((__version__,), 1), ("version",)),
            _single("diskferry_start_time_seconds", "gauge",
                    "When the daemon started, in seconds since the epoch.",
                    Sample((), self._started)),
            _single("process_open_fds", "gauge",
                    "File descriptors the process has open.",
                    Sample((), _open_fds())),
            _single("diskferry_threads", "gauge",
                    "Threads of the process: one per connection served, "
                    "and a few more.", Sample((), threading.active_count())),
        ]


def _single(name: str, type: str, help: str, sample: Sample,
            label_names: tuple[str, ...] = ()) -> Snapshot:
    return Snapshot(name, help, type, label_names, [sample])


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0
