"""Tickets as a scrape sees them: how many, which are moving data.

Read from the ticket store at each scrape. A ticket id never appears; a
transfer is named only by a ``transfer_id`` the management plane gave
(the default one is made of the ticket id), and only when asked.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable
from dataclasses import dataclass

from diskferry.daemon.metrics.exposition import Sample, Snapshot
from diskferry.daemon.tickets import Ticket, TicketInfo


@dataclass
class _Transfer:
    """One transfer_id's tickets, added up."""

    transferred: int = 0
    connections: int = 0
    idle: int | None = None

    def add(self, info: TicketInfo) -> None:
        self.transferred += info.get("transferred", 0)
        self.connections += info["connections"]
        idle = info["idle_time"]
        self.idle = idle if self.idle is None else min(self.idle, idle)


def transfer_snapshots(tickets: Iterable[Ticket],
                       by_transfer: bool) -> list[Snapshot]:
    """Tickets by ops, transfers active and idle, the longest idle time;
    with ``by_transfer``, bytes, connections and idle time per named
    transfer."""
    by_ops: Tally[str] = Tally()
    states: Tally[str] = Tally({"active": 0, "idle": 0})
    idle_max = 0
    named: dict[str, _Transfer] = {}
    for ticket in tickets:
        info = ticket.info()
        by_ops[",".join(info["ops"])] += 1
        states["active" if info["connections"] else "idle"] += 1
        idle_max = max(idle_max, info["idle_time"])
        if by_transfer and ticket.spec.transfer_id is not None:
            named.setdefault(ticket.spec.transfer_id, _Transfer()).add(info)
    snapshots = [
        Snapshot("diskferry_tickets", "Tickets installed, by ops.", "gauge",
                 ("ops",), [Sample((k,), v) for k, v in by_ops.items()]),
        Snapshot("diskferry_transfers",
                 "Tickets with a client connection (active) and without "
                 "(idle).", "gauge", ("state",),
                 [Sample((k,), v) for k, v in states.items()]),
        Snapshot("diskferry_transfer_idle_seconds_max",
                 "Longest time any ticket has gone without a request.",
                 "gauge", (), [Sample((), idle_max)]),
    ]
    if by_transfer:
        snapshots += _per_transfer(named)
    return snapshots


def _per_transfer(named: dict[str, _Transfer]) -> list[Snapshot]:
    def family(name: str, help: str, values: list[Sample]) -> Snapshot:
        return Snapshot(name, help, "gauge", ("transfer_id",), values)

    return [
        family("diskferry_transfer_bytes",
               "Bytes a transfer moved (tickets that only read or only "
               "write), overlaps once.",
               [Sample((k,), t.transferred) for k, t in named.items()]),
        family("diskferry_transfer_connections",
               "Client connections a transfer has open.",
               [Sample((k,), t.connections) for k, t in named.items()]),
        family("diskferry_transfer_idle_seconds",
               "Time a transfer has gone without a request.",
               [Sample((k,), t.idle or 0) for k, t in named.items()]),
    ]
