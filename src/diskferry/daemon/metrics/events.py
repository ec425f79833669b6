"""Counts of backend events, one call per event, process-wide.

Backends live below the HTTP layer and know no daemon: they report an
NBD connection made or closed, or an upstream request, with one call to
``BACKEND_EVENTS`` here, which imports nothing of the daemon (no
cycle). A process runs one daemon; tests that run several read these as
deltas.
"""

from __future__ import annotations

from diskferry.daemon.metrics.exposition import Counter, Gauge, Snapshot


class BackendEvents:
    """What the NBD and proxy backends count."""

    def __init__(self) -> None:
        self.nbd_exports = Gauge(
            "diskferry_nbd_exports_connected",
            "NBD connections open to exports, one per client connection "
            "that uses an NBD ticket.")
        self.nbd_connects = Counter(
            "diskferry_nbd_connects_total",
            "NBD connections made to exports.")
        self.nbd_errors = Counter(
            "diskferry_nbd_errors_total",
            "NBD connections that failed to open, and NBD commands the "
            "server refused.")
        self.upstream_requests = Counter(
            "diskferry_upstream_requests_total",
            "Requests the proxy backend sent to upstream images servers.")
        self.upstream_errors = Counter(
            "diskferry_upstream_errors_total",
            "Requests to upstream images servers that failed.")

    def nbd_connected(self) -> None:
        self.nbd_connects.inc()
        self.nbd_exports.inc()

    def nbd_disconnected(self) -> None:
        self.nbd_exports.inc((), -1)

    def nbd_failed(self) -> None:
        self.nbd_errors.inc()

    def upstream_request(self) -> None:
        self.upstream_requests.inc()

    def upstream_failed(self) -> None:
        self.upstream_errors.inc()

    def snapshots(self) -> list[Snapshot]:
        return [family.snapshot() for family in (
            self.nbd_exports, self.nbd_connects, self.nbd_errors,
            self.upstream_requests, self.upstream_errors)]


#: The process's backend events.
BACKEND_EVENTS = BackendEvents()
