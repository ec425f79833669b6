"""The backup jobs of one daemon: begun, served under tickets, ended."""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

from diskferry.daemon.backup.job import (
    BackupDisk,
    BackupJob,
    DiskExport,
    checkpoint_name,
)
from diskferry.daemon.backup.libvirt import (
    RUNNING,
    SHUT_OFF,
    DomainDisk,
    Virsh,
    backup_xml,
    checkpoint_xml,
)
from diskferry.daemon.backup.offline import add_checkpoint, offline_disks
from diskferry.daemon.backup.prune import Pruned, prune
from diskferry.daemon.backup.request import BackupRequest
from diskferry.daemon.backup.watch import ProcessWatch
from diskferry.daemon.tickets import StartExport, TicketExport, TicketSpec
from diskferry.errors import BadRequest, Conflict, ExportFailed, NotFound
from diskferry.qemuprocess import server_pid

log = logging.getLogger("diskferry.daemon.backup")

#: Folder of the run directory that holds the jobs' folders.
FOLDER = "backups"

#: Users QEMU runs as under libvirt (Debian, then Fedora): a job's folder
#: is theirs, so that QEMU can make its NBD socket there (a root-owned
#: folder makes ``nbd-server-start`` fail with "Permission denied").
QEMU_USERS = ("libvirt-qemu", "qemu")

#: The only disk format libvirt keeps checkpoints (bitmaps) in.
CHECKPOINT_FORMAT = "qcow2"

#: Seconds the job's NBD server may take to greet the daemon, which asks
#: the kernel which process serves it (QEMU listens before backup-begin
#: returns: this bounds a stalled QEMU only).
WATCH_TIMEOUT = 10.0

#: Longest socket path the kernel takes (sun_path, with its NUL).
_MAX_SOCKET_PATH = 107


#: Starts the daemon's export of a ticket's image file, whatever its
#: format (``ExportManager.serve``).
Serve = Callable[[TicketSpec], TicketExport]


class TicketInstaller(Protocol):
    """What the manager needs of the ticket store."""

    def add(self, ticket_dict: object,
            ticket_id: str | None = None) -> object: ...

    def remove(self, ticket_id: str) -> None: ...


class BackupManager:
    """Begins jobs and installs their tickets; thread-safe.

    ``start_export`` is the ticket store's ``StartExport``: a backup
    disk's ticket gets the job's export, any other ticket ``fallback``'s.
    ``serve`` starts the daemon's own export of a disk file, for a shut
    off domain.
    """

    def __init__(self, run_dir: str, fallback: StartExport,
                 serve: Serve, virsh: Virsh | None = None) -> None:
        self.folder = os.path.join(run_dir, FOLDER)
        self.virsh = virsh or Virsh()
        self._fallback = fallback
        self._serve = serve
        self._lock = threading.Lock()
        self._jobs: dict[str, BackupJob | None] = {}
        #: Jobs that ended while their tickets stayed (the domain
        #: stopped): ``stop`` removes those tickets.
        self._leftovers: list[BackupJob] = []
        self._pending: dict[str, Serve] = {}
        self._tickets: TicketInstaller | None = None

    def open(self, tickets: TicketInstaller) -> None:
        """Make the jobs' folder; end the jobs a killed daemon left, then
        remove their files."""
        self._tickets = tickets
        os.makedirs(self.folder, mode=0o711, exist_ok=True)
        os.chmod(self.folder, 0o711)
        left = os.listdir(self.folder)
        if left:
            self._end_stale_jobs()
        for name in left:
            shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)

    def start_export(self, spec: TicketSpec) -> TicketExport | None:
        with self._lock:
            export = self._pending.pop(spec.uuid, None)
        if export is not None:
            return export(spec)
        return self._fallback(spec)

    def jobs(self) -> list[BackupJob]:
        with self._lock:
            return [job for job in self._jobs.values()
                    if job is not None and not job.over]

    def job(self, domain: str) -> BackupJob:
        with self._lock:
            job = self._jobs.get(domain)
        if job is None or job.over:
            raise NotFound(f"No backup of domain {domain!r} is running")
        return job

    def checkpoints(self, domain: str) -> list[str]:
        return self.virsh.checkpoints(domain)

    def start(self, request: BackupRequest) -> BackupJob:
        """Begin a backup and install one ticket per disk."""
        with self._lock:
            if request.domain in self._jobs:
                raise Conflict(f"A backup of domain {request.domain!r} is "
                               f"running already; 'backup stop' ends it")
            self._jobs[request.domain] = None
        try:
            job = self._begin(request)
        except BaseException:
            with self._lock:
                del self._jobs[request.domain]
            raise
        with self._lock:
            self._jobs[request.domain] = job
        try:
            self._install(job, request.timeout)
            job.check()  # the domain may have stopped meanwhile
        except BaseException:
            self.stop(request.domain)
            raise
        return job

    def prune(self, domain: str, keep: int) -> Pruned:
        """Delete the domain's checkpoints but the newest ``keep``; no
        backup of it may run meanwhile."""
        with self._lock:
            if domain in self._jobs:
                raise Conflict(f"A backup of domain {domain!r} is running; "
                               f"prune after 'backup stop'")
            self._jobs[domain] = None
        try:
            return prune(self.virsh, domain, keep)
        finally:
            with self._lock:
                del self._jobs[domain]

    def stop(self, domain: str) -> None:
        """Remove the job's tickets (their requests end first), then end
        the job; or end the job a killed daemon left. The tickets of a
        job that ended with its domain go too."""
        with self._lock:
            job = self._jobs.get(domain)
            starting = domain in self._jobs and job is None
            ended = [j for j in self._leftovers
                     if j.domain == domain and j.live_tickets]
        if job is None and not ended:
            if not starting and self._end_stale(domain):
                return
            raise NotFound(f"No backup of domain {domain!r} is running")
        assert self._tickets is not None
        for each in ended if job is None else [*ended, job]:
            for ticket_id in each.live_tickets:
                self._tickets.remove(ticket_id)
            each.end()
            self._ended(each)

    def stop_all(self) -> None:
        """End every job (the daemon stops)."""
        for job in self.jobs():
            try:
                job.end()
            except Exception:
                log.exception("ending the backup of %s", job.domain)

    def _begin(self, request: BackupRequest) -> BackupJob:
        state = self.virsh.state(request.domain)
        if state not in (RUNNING, SHUT_OFF):
            raise BadRequest(f"Domain {request.domain!r} is {state}: only a "
                             f"running or shut off domain can be backed up")
        every = self.virsh.disks(request.domain)
        chosen = _chosen(every, request.disks, request.since is not None)
        self._check_since(request)
        if state == SHUT_OFF:
            return self._begin_offline(request, every, chosen)
        if self.virsh.job_running(request.domain) \
                and not self._end_stale(request.domain):
            raise Conflict(f"Another job runs on domain {request.domain!r} "
                           f"(virsh domjobinfo); it must end first")
        return self._begin_running(request, every, chosen)

    def _begin_offline(self, request: BackupRequest, every: list[DomainDisk],
                       chosen: list[DomainDisk]) -> BackupJob:
        disks = offline_disks(request.domain, chosen, request.since)
        tracked = [d for d in chosen if d.format == CHECKPOINT_FORMAT]
        checkpoint = checkpoint_name() if tracked else None
        if checkpoint is not None:
            add_checkpoint(self.virsh, request.domain, checkpoint, tracked,
                           [d.target for d in every if d not in tracked])
        log.info("backup of %s (shut off): checkpoint %s since %s",
                 request.domain, checkpoint, request.since or "(full)")
        return BackupJob(request.domain, checkpoint, request.since, None,
                         disks, None, self._ended)

    def _begin_running(self, request: BackupRequest, every: list[DomainDisk],
                       chosen: list[DomainDisk]) -> BackupJob:
        names = [disk.target for disk in chosen]
        others = [disk.target for disk in every if disk.target not in names]
        # Only qcow2 disks keep a checkpoint's bitmap: the others are
        # backed up in full, and a backup of no qcow2 disk makes none.
        tracked = [disk.target for disk in chosen
                   if disk.format == CHECKPOINT_FORMAT]
        checkpoint = checkpoint_name() if tracked else None
        folder = self._job_folder()
        try:
            socket_path = _socket_path(folder)
            backup_disks = [self._disk(request, name, socket_path)
                            for name in names]
            scratch = {name: os.path.join(folder, f"{name}.scratch")
                       for name in names}
            self.virsh.backup_begin(
                request.domain,
                backup_xml(socket_path, scratch, others, request.since),
                None if checkpoint is None else checkpoint_xml(
                    checkpoint, tracked,
                    [d.target for d in every if d.target not in tracked]),
                folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        log.info("backup of %s: job begun, checkpoint %s since %s",
                 request.domain, checkpoint, request.since or "(full)")
        job = BackupJob(request.domain, checkpoint, request.since, folder,
                        backup_disks, self.virsh.abort_job, self._ended)
        try:
            job.watch = _watch(job, socket_path)
        except BaseException:
            job.end()
            raise
        return job

    def _disk(self, request: BackupRequest, name: str,
              socket_path: str) -> BackupDisk:
        return BackupDisk(
            name=name, ticket_id=str(uuid.uuid4()),
            size=self.virsh.capacity(request.domain, name),
            url=f"nbd:unix:{socket_path}:exportname={name}",
            dirty=request.since is not None)

    def _check_since(self, request: BackupRequest) -> None:
        if request.since is None:
            return
        known = self.virsh.checkpoints(request.domain)
        if request.since not in known:
            raise BadRequest(
                f"Domain {request.domain!r} has no checkpoint "
                f"{request.since!r} (its checkpoints: "
                f"{', '.join(known) or 'none'})")

    def _end_stale(self, domain: str) -> bool:
        """End the backup a killed daemon of this run directory left
        running on ``domain``, if that is the job that runs there."""
        socket_path = self.virsh.backup_socket(domain)
        if socket_path is None \
                or not socket_path.startswith(self.folder + os.sep):
            return False
        log.warning("backup of %s: ending the job a previous daemon left",
                    domain)
        self.virsh.abort_job(domain)
        return True

    def _end_stale_jobs(self) -> None:
        """End the backups a killed daemon of this run directory left, on
        whichever running domain they are."""
        try:
            domains = self.virsh.running_domains()
        except Exception as e:  # the daemon starts, whatever libvirt says
            log.warning("backups a previous daemon left: %s", e)
            return
        for domain in domains:
            try:
                self._end_stale(domain)
            except Exception as e:  # one domain's failure, not the rest
                log.warning("backup of %s a previous daemon left: %s",
                            domain, e)

    def _job_folder(self) -> str:
        folder = os.path.join(self.folder, secrets.token_hex(4))
        os.mkdir(folder, 0o700)
        owner = _qemu_user()
        if owner is not None:
            os.chown(folder, owner.pw_uid, owner.pw_gid)
        return folder

    def _install(self, job: BackupJob, timeout: int) -> None:
        assert self._tickets is not None
        for disk in job.disks:
            with self._lock:
                self._pending[disk.ticket_id] = self._exporter(job, disk)
            try:
                self._tickets.add(disk.ticket(timeout), disk.ticket_id)
            finally:
                with self._lock:
                    self._pending.pop(disk.ticket_id, None)

    def _exporter(self, job: BackupJob, disk: BackupDisk) -> Serve:
        """What starts the export of ``disk``'s ticket."""
        if disk.format is None:
            return lambda spec: DiskExport(job, disk)

        def serve(spec: TicketSpec) -> TicketExport:
            try:
                return DiskExport(job, disk, self._serve(spec))
            except BadRequest as e:
                # qemu's words: the image's lock, when the domain started
                # meanwhile.
                raise Conflict(f"Disk {disk.name!r} of domain "
                               f"{job.domain!r} cannot be served: {e}") from e
        return serve

    def _ended(self, job: BackupJob) -> None:
        """Forget an ended job, but for its tickets if they stay (the
        domain stopped); idempotent."""
        with self._lock:
            registered = self._jobs.get(job.domain) is job
            if registered:
                del self._jobs[job.domain]
            self._leftovers = [j for j in self._leftovers
                               if j is not job and j.live_tickets]
            if registered and job.live_tickets:
                self._leftovers.append(job)


def _watch(job: BackupJob, socket_path: str) -> ProcessWatch | None:
    """Have the job end when the domain's QEMU, which serves it, ends."""
    pid = server_pid(socket_path, WATCH_TIMEOUT)
    if pid is None:
        raise _not_served(job, f"no NBD server answers on {socket_path}")
    try:
        return ProcessWatch(pid, job.domain_stopped,
                            f"backup-watch-{job.domain}")
    except ProcessLookupError as e:
        raise _not_served(job, str(e)) from e
    except OSError as e:
        log.warning("backup of %s: cannot watch its QEMU (%s): the job "
                    "ends only with its tickets", job.domain, e)
        return None


def _not_served(job: BackupJob, cause: str) -> ExportFailed:
    return ExportFailed(f"the backup of domain {job.domain!r} is not "
                        f"served: {cause} (did the domain stop?)")


def _chosen(disks: Sequence[DomainDisk], names: Sequence[str],
            incremental: bool) -> list[DomainDisk]:
    """The disks named, else every disk (every qcow2 disk for an
    incremental backup, the only ones with checkpoints)."""
    by_name = {disk.target: disk for disk in disks}
    for name in names:
        if name not in by_name:
            raise BadRequest(f"No disk {name!r} (disks: "
                             f"{', '.join(by_name) or 'none'})")
    if names:
        chosen = [by_name[name] for name in names]
    else:
        chosen = [disk for disk in disks if not incremental
                  or disk.format == CHECKPOINT_FORMAT]
    if not chosen:
        raise BadRequest("The domain has no disk to back up"
                         + (" incrementally (no qcow2 disk)"
                            if incremental else ""))
    for disk in chosen:
        if incremental and disk.format != CHECKPOINT_FORMAT:
            raise BadRequest(
                f"Disk {disk.target!r} is {disk.format}: libvirt keeps "
                f"checkpoints in qcow2 disks only, so it is backed up in "
                f"full only; leave it out with --disk")
    return chosen


def _socket_path(folder: str) -> str:
    path = os.path.join(folder, "nbd.sock")
    if len(path.encode()) > _MAX_SOCKET_PATH:
        raise ExportFailed(f"the run directory's path is too long for a "
                           f"socket: {path}")
    return path


def _qemu_user() -> pwd.struct_passwd | None:
    for name in QEMU_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None

