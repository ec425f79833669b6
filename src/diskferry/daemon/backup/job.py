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

    def ticket(self, timeout: int) -> dict[str, object]:
        return {"uuid": self.ticket_id, "size": self.size, "url": self.url,
                "ops": ["read"], "timeout": timeout, "dirty": self.dirty,
                "transfer_id": f"backup-{self.name}"}


@dataclass
class BackupJob:
    """A running pull-mode backup and the folder it owns; thread-safe.

    ``watch`` notices the domain's end (``domain_stopped``); the job's
    end closes it.
    """

    domain: str
    checkpoint: str | None
    since: str | None
    folder: str
    disks: list[BackupDisk]
    abort: Callable[[str], None]
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
            if abort:
                self.abort(self.domain)
        finally:
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
    """A disk of a job as its ticket's export: QEMU serves it; stopping
    it releases the disk.

    Once the job is over, ``url()`` and ``failure()`` raise the error
    that answers the request (403: the job ended; 410: the domain
    stopped) rather than name a death the next connection would undo.
    """

    def __init__(self, job: BackupJob, disk: BackupDisk) -> None:
        self.job = job
        self.disk = disk
        self._stopped = False

    def url(self) -> str:
        self._check()
        return self.disk.url

    def failure(self) -> str | None:
        self._check()
        return None

    def _check(self) -> None:
        self.job.check()
        if self._stopped:
            raise backup_ended(self.job.domain)

    def describe(self) -> dict[str, object]:
        return {"kind": "libvirt-backup", "domain": self.job.domain,
                "disk": self.disk.name, "checkpoint": self.job.checkpoint,
                "since": self.job.since, "url": self.disk.url,
                "running": not (self._stopped or self.job.over)}

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.job.release(self.disk.name)


if TYPE_CHECKING:
    _export: type[TicketExport] = DiskExport
