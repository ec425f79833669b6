"""Tickets: what a client may do with an image, and for how long.

A ticket is installed by the management plane on the control service and
names one image (a backend URL), its size, the allowed ops and a timeout.
Its id is the bearer secret in ``/images/{id}``.

Lifecycle (every transition is here, the rest of the code only asks):

    state      how it is entered                  new requests
    --------   --------------------------------   ---------------------
    ready      added (or replaced)                served
    active     an operation started               served
    ready      last operation ended (expiry       served
               is extended by ``timeout``)
    expired    monotonic time passed ``expires``  403
    canceled   DELETE /tickets/{id}               403; the delete waits
                                                  for running operations
    removed    cancel completed                   403 (unknown ticket)

Operations check ``canceled`` between chunks, so a delete stops a
transfer after its current chunk rather than after the whole request.
"""

import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from types import TracebackType
from typing import NotRequired, Protocol, TypedDict

from diskferry.daemon.jsonfield import TICKET_FIELDS, field
from diskferry.daemon.ranges import RangeSet
from diskferry.errors import (
    BadRequest,
    Forbidden,
    TicketForbidden,
    TicketInUse,
    TicketNotFound,
)

VALID_OPS = ("read", "write")

#: Seconds an idle client connection is kept when neither the ticket nor
#: the configuration says otherwise (ovirt-imageio's default too).
DEFAULT_INACTIVITY_TIMEOUT = 60

#: Seconds a ticket delete waits for running requests before 409.
DEFAULT_REMOVE_TIMEOUT = 60


#: Largest ticket ``timeout`` (also by PATCH): a year. A ticket is
#: extended by every request and by PATCH, so no transfer needs more; a
#: larger value is a mistake, and past ~292 years overflows the clocks.
MAX_TIMEOUT = 365 * 24 * 3600

#: Largest ticket ``inactivity_timeout``: a week. Clients pause for minutes
#: (virt-v2v flushes every 15-30 s); the value becomes a socket timeout,
#: which overflows past ~292 years (``OverflowError``, ``struct.error``).
MAX_INACTIVITY_TIMEOUT = 7 * 24 * 3600

#: Largest ticket ``size``: the largest offset a file can have (off_t).
MAX_SIZE = 2**63 - 1


#: Raises ValueError saying what is wrong with a ticket's URL: no backend
#: serves its scheme, or the backend refuses it. The daemon passes the
#: backend registry's check, so that a bad URL is a 400 when the ticket is
#: installed, not a 500 on first use; tickets know no backend.
UrlCheck = Callable[[urllib.parse.SplitResult], None]


#: The ``format`` of a ticket serving an image file's own bytes.
RAW = "raw"

#: What a format name looks like (qemu's block driver names): checked
#: before the name reaches a command line.
_FORMAT_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def monotonic() -> int:
    return int(time.monotonic())


# Validation


def parse_ticket_url(value: str,
                     check_url: UrlCheck) -> urllib.parse.SplitResult:
    try:
        url = urllib.parse.urlsplit(value)
    except ValueError as e:
        raise BadRequest(f"Invalid ticket field 'url': {e}") from None
    try:
        check_url(url)
    except ValueError as e:
        raise BadRequest(f"Invalid ticket field 'url': {e}") from None
    return url


@dataclass(frozen=True)
class TicketSpec:
    """The validated fields of a ticket, as the management plane sent them."""

    uuid: str
    size: int
    url: str
    ops: tuple[str, ...]
    timeout: int
    inactivity_timeout: int
    sparse: bool = False
    dirty: bool = False
    transfer_id: str | None = None
    filename: str | None = None
    #: The image's format: ``raw`` serves the file's bytes; any other
    #: format qemu reads serves the guest data, through an export the
    #: daemon runs for the ticket (a diskferry extension).
    format: str = RAW
    #: False: only the top layer of a format image, holes kept as holes.
    backing_chain: bool = True
    #: The persistent bitmap whose dirty extents a dirty ticket serves.
    bitmap: str | None = None

    @property
    def exported(self) -> bool:
        """Whether the daemon runs an export for this ticket."""
        return self.format != RAW

    @property
    def read_only(self) -> bool:
        return "write" not in self.ops

    @classmethod
    def from_dict(cls, d: object, check_url: UrlCheck,
                  default_inactivity: int = DEFAULT_INACTIVITY_TIMEOUT,
                  ) -> "TicketSpec":
        if not isinstance(d, dict):
            raise BadRequest("Ticket must be a JSON object")
        ops = _ops(d)
        url = field(d, "url", str, required=True, errors=TICKET_FIELDS)
        parse_ticket_url(url, check_url)
        return cls(
            uuid=field(d, "uuid", str, required=True, errors=TICKET_FIELDS),
            size=field(d, "size", int, required=True, minimum=0,
                       maximum=MAX_SIZE, errors=TICKET_FIELDS),
            url=url,
            ops=ops,
            timeout=field(d, "timeout", int, required=True, minimum=0,
                          maximum=MAX_TIMEOUT, errors=TICKET_FIELDS),
            inactivity_timeout=field(
                d, "inactivity_timeout", int, default_inactivity, minimum=0,
                maximum=MAX_INACTIVITY_TIMEOUT, errors=TICKET_FIELDS),
            sparse=field(d, "sparse", bool, False, errors=TICKET_FIELDS),
            dirty=field(d, "dirty", bool, False, errors=TICKET_FIELDS),
            transfer_id=field(d, "transfer_id", str, errors=TICKET_FIELDS),
            filename=field(d, "filename", str, errors=TICKET_FIELDS),
            **_format_fields(d, url),
        )


def _ops(d: dict[str, object]) -> tuple[str, ...]:
    ops = field(d, "ops", list, required=True, errors=TICKET_FIELDS)
    for op in ops:
        if op not in VALID_OPS:
            raise BadRequest(
                f"Invalid ticket field 'ops': unknown op {op!r:.40}; "
                f"valid ops: {', '.join(VALID_OPS)}")
    return tuple(ops)


class _FormatFields(TypedDict):
    format: str
    backing_chain: bool
    bitmap: str | None


def _format_fields(d: dict[str, object], url: str) -> _FormatFields:
    """``format``, ``backing_chain`` and ``bitmap``, and how they fit."""
    fmt = field(d, "format", str, RAW, errors=TICKET_FIELDS)
    if not _FORMAT_NAME.fullmatch(fmt):
        raise BadRequest(f"Invalid ticket field 'format': {fmt!r:.40} is "
                         f"not a format name (raw, qcow2, vmdk, ...)")
    backing_chain = field(d, "backing_chain", bool, True, errors=TICKET_FIELDS)
    bitmap = field(d, "bitmap", str, errors=TICKET_FIELDS)
    if fmt != RAW and not url.startswith("file:"):
        raise BadRequest(f"Invalid ticket field 'format': {fmt!r} needs a "
                         f"file: url (an NBD export or a server serves "
                         f"guest data already)")
    if fmt == RAW and (not backing_chain or bitmap is not None):
        name = "bitmap" if bitmap is not None else "backing_chain"
        raise BadRequest(f"Invalid ticket field {name!r}: a raw image has "
                         f"no {'bitmaps' if bitmap else 'backing chain'}; "
                         f"give the image's format")
    if bitmap is not None and not d.get("dirty"):
        raise BadRequest("Invalid ticket field 'bitmap': only a dirty "
                         "ticket serves a bitmap (\"dirty\": true)")
    return {"format": fmt, "backing_chain": backing_chain, "bitmap": bitmap}


# Exports


class TicketExport(Protocol):
    """What the daemon runs for one ticket's life so that its image can
    be served (``daemon.exports``: a qemu-nbd for a format image)."""

    def url(self) -> str:
        """The URL a backend opens, the export started again if it
        stopped or died."""

    def failure(self) -> str | None:
        """How the export died, if it did (None while it runs)."""

    def describe(self) -> dict[str, object]:
        """What serves the ticket, for ``GET /tickets/{id}``."""

    def stop(self) -> None:
        """Stop serving; ``url()`` starts it again."""


#: Starts what a ticket spec needs the daemon to run, at ticket add, or
#: returns None; raises ``BadRequest`` naming what is wrong with the image.
StartExport = Callable[[TicketSpec], TicketExport | None]


def _no_export(spec: TicketSpec) -> TicketExport | None:
    if spec.exported:
        raise BadRequest(f"Invalid ticket field 'format': this daemon "
                         f"serves no {spec.format!r} images")
    return None


# Tickets


class TicketInfo(TypedDict):
    """A ticket as ``GET /tickets/{id}`` shows it."""

    active: bool
    canceled: bool
    connections: int
    expires: int
    idle_time: int
    inactivity_timeout: int
    ops: list[str]
    size: int
    sparse: bool
    dirty: bool
    timeout: int
    url: str
    uuid: str
    transfer_id: str
    filename: NotRequired[str]
    #: Only for a ticket with a format other than raw.
    format: NotRequired[str]
    backing_chain: NotRequired[bool]
    bitmap: NotRequired[str]
    #: What serves the ticket, when the daemon runs it (``TicketExport``).
    export: NotRequired[dict[str, object]]
    #: Only for a read-only or write-only ticket.
    transferred: NotRequired[int]


class Operation:
    """A request in progress on a ticket; ``done`` counts bytes moved."""

    __slots__ = ("ticket", "offset", "done")

    def __init__(self, ticket: "Ticket", offset: int) -> None:
        self.ticket = ticket
        self.offset = offset
        self.done = 0

    def check(self) -> None:
        """Raise if the ticket was canceled since the operation started."""
        if self.ticket.canceled:
            raise Forbidden(f"Transfer {self.ticket.transfer_id} was canceled")


class Ticket:
    """A ticket and its run-time state; thread-safe."""

    def __init__(self, spec: TicketSpec,
                 export: TicketExport | None = None) -> None:
        self.spec = spec
        #: What the daemon runs to serve this ticket, stopped with it.
        self.export = export
        self._lock = threading.Lock()
        self._ongoing: set[Operation] = set()
        self._idle = threading.Condition(self._lock)
        self._completed = RangeSet()
        # connection id -> closer of its resources
        self._connections: dict[Hashable, Callable[[], None]] = {}
        self.canceled = False
        now = monotonic()
        self.expires = now + spec.timeout
        self._access_time = now

    @property
    def uuid(self) -> str:
        return self.spec.uuid

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def transfer_id(self) -> str:
        return self.spec.transfer_id or f"(ticket/{self.spec.uuid[:18]})"

    def may(self, op: str) -> bool:
        """``write`` implies ``read``."""
        if op == "read":
            return bool(self.spec.ops)
        return op in self.spec.ops

    @property
    def expired(self) -> bool:
        return monotonic() >= self.expires

    def extend(self, timeout: int) -> None:
        self.expires = monotonic() + timeout

    # Operations

    def operation(self, offset: int = 0) -> "_OperationScope":
        """Context manager registering an operation for its duration."""
        return _OperationScope(self, offset)

    def _begin(self, offset: int) -> Operation:
        op = Operation(self, offset)
        with self._lock:
            if self.canceled:
                raise TicketForbidden(
                    f"Transfer {self.transfer_id} was canceled")
            self._ongoing.add(op)
        return op

    def _end(self, op: Operation, completed: bool) -> None:
        with self._lock:
            self._ongoing.discard(op)
            if completed and len(self.spec.ops) == 1:
                self._completed.add(op.offset, op.offset + op.done)
            if not self._ongoing:
                self._idle.notify_all()
            now = monotonic()
            self._access_time = now
            if completed:
                self.expires = now + self.spec.timeout

    @property
    def active(self) -> bool:
        return bool(self._ongoing)

    def transferred(self) -> int | None:
        """Bytes moved, overlaps once; None for read-write tickets.

        A read-write ticket mixes both directions, so no single figure
        means anything (ovirt-imageio omits it too).
        """
        if len(self.spec.ops) != 1:
            return None
        with self._lock:
            ongoing = [(op.offset, op.offset + op.done) for op in self._ongoing]
            return self._completed.total(ongoing)

    # Connections

    def add_connection(self, conn_id: Hashable,
                       closer: Callable[[], None]) -> None:
        with self._lock:
            if self.canceled:
                raise TicketForbidden(
                    f"Transfer {self.transfer_id} was canceled")
            self._connections[conn_id] = closer

    def remove_connection(self, conn_id: Hashable) -> None:
        with self._lock:
            self._connections.pop(conn_id, None)

    # Canceling

    def cancel(self, timeout: float) -> None:
        """Refuse new requests, wait up to ``timeout`` for running ones.

        Returns when no operation runs, having released the resources of
        idle connections; raises TicketInUse if operations outlast it.
        """
        with self._lock:
            self.canceled = True
            if not self._idle.wait_for(lambda: not self._ongoing, timeout):
                raise TicketInUse(
                    f"Transfer {self.transfer_id} still has "
                    f"{len(self._ongoing)} operations running; retry later")
            closers = list(self._connections.values())
        for close in closers:
            close()

    def info(self) -> TicketInfo:
        spec = self.spec
        with self._lock:
            active = bool(self._ongoing)
            idle_time = 0 if active else monotonic() - self._access_time
            connections = len(self._connections)
        info: TicketInfo = {
            "active": active,
            "canceled": self.canceled,
            "connections": connections,
            "expires": self.expires,
            "idle_time": idle_time,
            "inactivity_timeout": spec.inactivity_timeout,
            "ops": list(spec.ops),
            "size": spec.size,
            "sparse": spec.sparse,
            "dirty": spec.dirty,
            "timeout": spec.timeout,
            "url": spec.url,
            "uuid": spec.uuid,
            "transfer_id": self.transfer_id,
        }
        if spec.filename:
            info["filename"] = spec.filename
        if spec.exported:
            info["format"] = spec.format
            info["backing_chain"] = spec.backing_chain
            if spec.bitmap is not None:
                info["bitmap"] = spec.bitmap
        if self.export is not None:
            info["export"] = self.export.describe()
        transferred = self.transferred()
        if transferred is not None:
            info["transferred"] = transferred
        return info


class _OperationScope:
    __slots__ = ("ticket", "offset", "op")

    def __init__(self, ticket: Ticket, offset: int) -> None:
        self.ticket = ticket
        self.offset = offset

    def __enter__(self) -> Operation:
        self.op = self.ticket._begin(self.offset)
        return self.op

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.ticket._end(self.op, completed=exc_type is None)
        if exc_type is None:
            # Canceled while running: the work is not acknowledged.
            self.op.check()


class TicketStore:
    """The daemon's tickets, by id; thread-safe.

    ``check_url`` vets the URL of every ticket added (see ``UrlCheck``);
    ``start_export`` starts what a ticket needs the daemon to run (see
    ``StartExport``), which the store stops when the ticket is removed
    and, while no request runs, when it has expired.
    """

    def __init__(self, check_url: UrlCheck,
                 remove_timeout: float = DEFAULT_REMOVE_TIMEOUT,
                 default_inactivity: int = DEFAULT_INACTIVITY_TIMEOUT,
                 start_export: StartExport = _no_export,
                 ) -> None:
        self.check_url = check_url
        self.remove_timeout = remove_timeout
        self.default_inactivity = default_inactivity
        self.start_export = start_export
        self._lock = threading.Lock()
        self._tickets: dict[str, Ticket] = {}

    def add(self, ticket_dict: object, ticket_id: str | None = None) -> Ticket:
        spec = TicketSpec.from_dict(ticket_dict, self.check_url,
                                    self.default_inactivity)
        if ticket_id is not None and spec.uuid != ticket_id:
            raise BadRequest(
                f"Invalid ticket field 'uuid': not the id in the URL "
                f"{ticket_id!r}")
        with self._lock:
            replaced = self._tickets.get(spec.uuid)
        if replaced is not None and replaced.export is not None:
            # Its export holds the image's lock: it ends first.
            self.remove(spec.uuid)
        ticket = Ticket(spec, self.start_export(spec))
        with self._lock:
            self._tickets[spec.uuid] = ticket
        return ticket

    def get(self, ticket_id: str) -> Ticket:
        with self._lock:
            ticket = self._tickets.get(ticket_id)
        if ticket is None:
            raise TicketNotFound(f"No such ticket {ticket_id!r}")
        return ticket

    def tickets(self) -> list[Ticket]:
        """Every ticket, ordered by id."""
        with self._lock:
            return [self._tickets[key] for key in sorted(self._tickets)]

    def authorize(self, ticket_id: str, op: str) -> Ticket:
        """The ticket if it allows ``op`` now; 403 otherwise."""
        with self._lock:
            ticket = self._tickets.get(ticket_id)
        if ticket is None:
            raise TicketForbidden(f"No such ticket {ticket_id!r}")
        if ticket.canceled:
            raise TicketForbidden(
                f"Transfer {ticket.transfer_id} was canceled")
        if ticket.expired:
            raise TicketForbidden(f"Ticket {ticket_id!r} expired")
        if not ticket.may(op):
            raise TicketForbidden(
                f"Ticket {ticket_id!r} does not allow {op!r}")
        return ticket

    def remove(self, ticket_id: str) -> None:
        """Cancel and remove; idempotent. Raises TicketInUse (409)."""
        with self._lock:
            ticket = self._tickets.get(ticket_id)
        if ticket is None:
            return
        ticket.cancel(self.remove_timeout)
        with self._lock:
            if self._tickets.get(ticket_id) is ticket:
                del self._tickets[ticket_id]
        if ticket.export is not None:
            ticket.export.stop()

    def clear(self) -> None:
        with self._lock:
            tickets = list(self._tickets.values())
            self._tickets.clear()
        for ticket in tickets:
            try:
                ticket.cancel(0)
            except TicketInUse:
                pass
            if ticket.export is not None:
                ticket.export.stop()

    def stop_idle_exports(self) -> None:
        """Stop the exports of expired tickets that no request uses; one
        starts again if its ticket is extended and used."""
        for ticket in self.tickets():
            if ticket.export is not None and ticket.expired \
                    and not ticket.active:
                ticket.export.stop()

    def stop_exports(self) -> None:
        """Stop every ticket's export (the daemon stops)."""
        for ticket in self.tickets():
            if ticket.export is not None:
                ticket.export.stop()

    def __len__(self) -> int:
        with self._lock:
            return len(self._tickets)
