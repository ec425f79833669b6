"""A backup job, its disks, and each disk as a ticket's export."""

from __future__ import annotations

import datetime
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from diskferry.errors import Forbidden

if TYPE_CHECKING:
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
    """A running pull-mode backup and the folder it owns; thread-safe."""

    domain: str
    checkpoint: str | None
    since: str | None
    folder: str
    disks: list[BackupDisk]
    abort: Callable[[str], None]
    ended: Callable[[BackupJob], None]
    _live: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _over: bool = False

    def __post_init__(self) -> None:
        self._live = {disk.name for disk in self.disks}

    @property
    def over(self) -> bool:
        return self._over

    def release(self, disk: str) -> None:
        """The ticket of ``disk`` ended; the last one ends the job."""
        with self._lock:
            self._live.discard(disk)
            last = not self._live
        if last:
            self.end()

    def end(self) -> None:
        """Abort the job in libvirt and remove its folder; idempotent."""
        with self._lock:
            if self._over:
                return
            self._over = True
        try:
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
    it releases the disk."""

    def __init__(self, job: BackupJob, disk: BackupDisk) -> None:
        self.job = job
        self.disk = disk
        self._stopped = False

    def url(self) -> str:
        cause = self.failure()
        if cause is not None:
            raise BackupEnded(cause)
        return self.disk.url

    def failure(self) -> str | None:
        if self._stopped or self.job.over:
            return (f"the backup job of domain {self.job.domain!r} ended; "
                    f"start another backup")
        return None

    def describe(self) -> dict[str, object]:
        return {"kind": "libvirt-backup", "domain": self.job.domain,
                "disk": self.disk.name, "checkpoint": self.job.checkpoint,
                "since": self.job.since, "url": self.disk.url,
                "running": self.failure() is None}

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.job.release(self.disk.name)


if TYPE_CHECKING:
    _export: type[TicketExport] = DiskExport
