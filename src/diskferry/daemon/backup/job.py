"""A backup job, its disks, and each disk as a ticket's export."""

from __future__ import annotations

import datetime
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from diskferry.errors import Forbidden, Gone, RequestError

if TYPE_CHECKING:
    from diskferry.daemon.backup.watch import ProcessWatch
    from diskferry.daemon.tickets import TicketExport

log = logging.getLogger("diskferry.daemon.backup")

#: Checkpoints this daemon makes are named so, then by UTC time: their
#: names sort as they were made.
CHECKPOINT_PREFIX = "diskferry-"


def checkpoint_name(now: datetime.datetime | None = None) -> str:
    """A new checkpoint's name: later ones sort after."""
    now = now or datetime.datetime.now(datetime.UTC)
    return CHECKPOINT_PREFIX + now.strftime("%Y%m%dT%H%M%S-%f")


class BackupEnded(Forbidden):
    """Raised when a ticket outlives its backup job: a job never starts
    again, as a transfer that was canceled."""


def backup_ended(domain: str) -> BackupEnded:
    return BackupEnded(f"The backup job of domain {domain!r} ended; start "
                       f"another backup")


class DomainStopped(Gone):
    """Raised when a ticket outlives its backup job because the domain
    stopped (destroyed, shut down): what it served is gone for good."""


@dataclass(frozen=True)
class BackupDisk:
    """One disk of a job, served under its own ticket."""

    name: str
    ticket_id: str
    size: int
    url: str
    dirty: bool
    #: A disk file's format, when the daemon serves it (a shut off
    #: domain), and the bitmap of its dirty extents.
    format: str | None = None
    bitmap: str | None = None

    def ticket(self, timeout: int) -> dict[str, object]:
        ticket: dict[str, object] = {
            "uuid": self.ticket_id, "size": self.size, "url": self.url,
            "ops": ["read"], "timeout": timeout, "dirty": self.dirty,
            "transfer_id": f"backup-{self.name}"}
        if self.format is not None:
            ticket["format"] = self.format
        if self.bitmap is not None:
            ticket["bitmap"] = self.bitmap
        return ticket


@dataclass
class BackupJob:
    """A running backup and the folder it owns; thread-safe.

    A running domain's job is libvirt's pull-mode job (``abort`` ends
    it), with its ``folder``; ``watch`` notices the domain's end
    (``domain_stopped``), and the job's end closes it. A shut off
    domain's job has none of these: the daemon serves its disks.
    """

    domain: str
    checkpoint: str | None
    since: str | None
    folder: str | None
    disks: list[BackupDisk]
    abort: Callable[[str], None] | None
    ended: Callable[[BackupJob], None]
    watch: ProcessWatch | None = None
    _live: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: Once over: the error that answers a request on its tickets.
    _end: RequestError | None = None

    def __post_init__(self) -> None:
        self._live = {disk.name for disk in self.disks}

    @property
    def over(self) -> bool:
        return self._end is not None

    @property
    def live_tickets(self) -> list[str]:
        """The tickets whose disks are still served or could be."""
        with self._lock:
            return [d.ticket_id for d in self.disks if d.name in self._live]

    def check(self) -> None:
        """Raise what answers a request once the job is over."""
        end = self._end
        if end is not None:
            raise type(end)(end.message)

    def release(self, disk: str) -> None:
        """The ticket of ``disk`` ended; the last one ends the job."""
        with self._lock:
            self._live.discard(disk)
            last = not self._live
        if last:
            self.end()

    def end(self) -> None:
        """Abort the job in libvirt and remove its folder; idempotent."""
        self._finish(backup_ended(self.domain), abort=True)

    def domain_stopped(self) -> None:
        """The domain's QEMU ended, and the job with it: its tickets say
        so; nothing is left to abort."""
        log.warning("backup of %s: the domain stopped", self.domain)
        self._finish(DomainStopped(
            f"The backup of domain {self.domain!r} ended: the domain "
            f"stopped; start another backup"), abort=False)

    def _finish(self, answer: RequestError, abort: bool) -> None:
        with self._lock:
            if self._end is not None:
                return
            self._end = answer
        try:
            if self.watch is not None:
                self.watch.close()
            if abort and self.abort is not None:
                self.abort(self.domain)
        finally:
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
            self.ended(self)
            log.info("backup of %s: job ended (checkpoint %s)", self.domain,
                     self.checkpoint)

    def describe(self, images_url: str) -> dict[str, object]:
        return {"domain": self.domain, "checkpoint": self.checkpoint,
                "since": self.since,
                "disks": [{"name": d.name, "ticket": d.ticket_id,
                           "transfer_url": images_url + d.ticket_id,
                           "size": d.size, "dirty": d.dirty}
                          for d in self.disks]}


class DiskExport:
    """A disk of a job as its ticket's export: QEMU serves it, or
    ``served``, the daemon's own export of a shut off domain's disk;
    stopping it releases the disk.

    Once the job is over, ``url()`` and ``failure()`` raise the error
    that answers the request (403: the job ended; 410: the domain
    stopped) rather than name a death the next connection would undo.
    """

    def __init__(self, job: BackupJob, disk: BackupDisk,
                 served: TicketExport | None = None) -> None:
        self.job = job
        self.disk = disk
        self._served = served
        self._stopped = False

    def url(self) -> str:
        self._check()
        return self.disk.url if self._served is None else self._served.url()

    def failure(self) -> str | None:
        self._check()
        return None if self._served is None else self._served.failure()

    def _check(self) -> None:
        self.job.check()
        if self._stopped:
            raise backup_ended(self.job.domain)

    def describe(self) -> dict[str, object]:
        info: dict[str, object] = {
            "kind": "libvirt-backup", "domain": self.job.domain,
            "disk": self.disk.name, "checkpoint": self.job.checkpoint,
            "since": self.job.since, "url": self.disk.url,
            "running": not (self._stopped or self.job.over)}
        if self._served is not None:
            info["export"] = self._served.describe()
        return info

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            if self._served is not None:
                self._served.stop()
        finally:
            self.job.release(self.disk.name)


if TYPE_CHECKING:
    _export: type[TicketExport] = DiskExport
