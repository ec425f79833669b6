"""libvirt, as the daemon drives a domain's pull-mode backup: ``virsh``.

Why a command and not the libvirt-python binding: the binding is built
from C on install (a compiler and libvirt's headers), and a backup
makes a handful of calls, none on the data path; ``virsh`` comes with
every libvirt host (Debian: libvirt-clients) and says what failed in
words the daemon can pass on. A host without it keeps serving tickets;
only ``backup`` says what is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from diskferry.errors import BadRequest, RequestError

#: The connection of the system's QEMU domains.
DEFAULT_URI = "qemu:///system"

#: The states of a domain that can be backed up, as ``virsh domstate``
#: says them.
RUNNING = "running"
SHUT_OFF = "shut off"

#: Seconds one virsh call may take (a backup-begin freezes nothing, but
#: a busy libvirtd answers slowly).
VIRSH_TIMEOUT = 60.0


class LibvirtError(BadRequest):
    """Raised when virsh refuses a call: its message, as libvirt says it."""


class LibvirtUnavailable(RequestError):
    """Raised when this host cannot run a backup: no virsh, or no libvirtd
    answering."""

    status = 503


@dataclass(frozen=True)
class DomainDisk:
    """A disk of a domain, as its live XML names it."""

    target: str
    source: str
    format: str


class Virsh:
    """``virsh -c URI`` calls, each a subprocess; thread-safe."""

    def __init__(self, uri: str = DEFAULT_URI) -> None:
        self.uri = uri

    def run(self, *args: str, stdin: str | None = None) -> str:
        """virsh's output; ``LibvirtError`` with its message if it fails.
        ``stdin`` is what virsh reads as the file ``/dev/stdin``."""
        binary = shutil.which("virsh")
        if binary is None:
            raise LibvirtUnavailable(
                "virsh not found: backups need libvirt's client (Debian "
                "package libvirt-clients) and a running libvirtd")
        try:
            done = subprocess.run(
                [binary, "-q", "-c", self.uri, *args], capture_output=True,
                text=True, timeout=VIRSH_TIMEOUT, check=False,
                input=stdin, stdin=None if stdin is not None
                else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise LibvirtUnavailable(f"virsh {args[0]} did not answer within "
                                     f"{VIRSH_TIMEOUT:.0f} s") from e
        if done.returncode != 0:
            message = " ".join(line.removeprefix("error: ").strip()
                               for line in done.stderr.splitlines()
                               if line.strip())
            if "Failed to connect" in message:
                raise LibvirtUnavailable(f"libvirt at {self.uri}: {message}")
            raise LibvirtError(message or f"virsh {args[0]} failed")
        return done.stdout

    def state(self, domain: str) -> str:
        """``running``, ``shut off``, ...; ``LibvirtError`` if unknown."""
        return self.run("domstate", domain).strip()

    def running_domains(self) -> list[str]:
        """The names of the running domains."""
        return [line.strip() for line in self.run("list", "--name").splitlines()
                if line.strip()]

    def disks(self, domain: str) -> list[DomainDisk]:
        """The domain's file disks, from its live XML."""
        root = ET.fromstring(self.run("dumpxml", domain))
        found = []
        for disk in root.iterfind("./devices/disk[@device='disk']"):
            target = disk.find("target")
            source = disk.find("source")
            driver = disk.find("driver")
            if target is None or source is None:
                continue
            found.append(DomainDisk(
                target=target.get("dev", ""),
                source=source.get("file") or source.get("dev") or "",
                format=driver.get("type", "raw") if driver is not None
                else "raw"))
        return found

    def capacity(self, domain: str, disk: str) -> int:
        """A disk's virtual size in bytes."""
        for line in self.run("domblkinfo", domain, disk).splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "Capacity":
                return int(value.strip())
        raise LibvirtError(f"virsh domblkinfo {domain} {disk}: no capacity")

    def checkpoints(self, domain: str) -> list[str]:
        """The domain's checkpoints, oldest first."""
        out = self.run("checkpoint-list", domain, "--name", "--topological")
        return [line.strip() for line in out.splitlines() if line.strip()]

    def checkpoint_bitmaps(self, domain: str, name: str) -> dict[str, str]:
        """The bitmap of checkpoint ``name`` in each disk that has one."""
        root = ET.fromstring(self.run("checkpoint-dumpxml", domain, name))
        return {disk.get("name", ""): disk.get("bitmap") or name
                for disk in root.iterfind("./disks/disk")
                if disk.get("checkpoint") == "bitmap"}

    def delete_checkpoint(self, domain: str, name: str,
                          metadata_only: bool = False) -> None:
        """Delete a checkpoint and its bitmaps (a running domain's), or
        libvirt's record of it only."""
        self.run("checkpoint-delete", domain, name,
                 *(["--metadata"] if metadata_only else []))

    def job_running(self, domain: str) -> bool:
        """Whether a job (a backup, a migration) runs on the domain."""
        for line in self.run("domjobinfo", domain).splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "Job type":
                return value.strip() not in ("None", "")
        return False

    def backup_socket(self, domain: str) -> str | None:
        """The NBD socket of the domain's pull-mode backup, if one runs."""
        try:
            out = self.run("backup-dumpxml", domain)
        except LibvirtError as e:
            if "no domain backup job" in str(e):
                return None
            raise
        server = ET.fromstring(out).find("server")
        return server.get("socket") if server is not None else None

    def backup_begin(self, domain: str, backup_xml: str,
                     checkpoint_xml: str | None, folder: str) -> None:
        """Begin a backup job, making a checkpoint when given one,
        described by XML files written in ``folder``."""
        args = [_write(folder, "backup.xml", backup_xml)]
        if checkpoint_xml is not None:
            args.append(_write(folder, "checkpoint.xml", checkpoint_xml))
        self.run("backup-begin", domain, *args)

    def redefine_checkpoint(self, domain: str, xml: str) -> None:
        """Tell libvirt of a checkpoint whose bitmaps exist already."""
        self.run("checkpoint-create", domain, "/dev/stdin", "--redefine",
                 stdin=xml)

    def abort_job(self, domain: str) -> None:
        """End the domain's job; none running, or no domain running any
        more (its jobs ended with it), is no failure."""
        try:
            self.run("domjobabort", domain)
        except LibvirtError as e:
            if "no job" not in str(e).lower() and self._running(domain):
                raise

    def _running(self, domain: str) -> bool:
        try:
            return self.state(domain) == "running"
        except LibvirtError:
            return False


def _write(folder: str, name: str, text: str) -> str:
    path = f"{folder}/{name}"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def backup_xml(socket_path: str, scratch: dict[str, str], others: Sequence[str],
               since: str | None) -> str:
    """A pull-mode backup: the ``scratch`` disks (target -> scratch file)
    exported on ``socket_path``, the ``others`` left out, incremental
    since the checkpoint ``since``."""
    root = ET.Element("domainbackup", mode="pull")
    if since is not None:
        ET.SubElement(root, "incremental").text = since
    ET.SubElement(root, "server", transport="unix", socket=socket_path)
    disks = ET.SubElement(root, "disks")
    for target, path in scratch.items():
        disk = ET.SubElement(disks, "disk", name=target, backup="yes",
                             type="file")
        ET.SubElement(disk, "scratch", file=path)
    for target in others:
        ET.SubElement(disks, "disk", name=target, backup="no")
    return ET.tostring(root, encoding="unicode")


def checkpoint_xml(name: str, disks: Sequence[str], others: Sequence[str],
                   *, parent: str | None = None,
                   created: int | None = None) -> str:
    """A checkpoint ``name`` with a bitmap in each of ``disks``; with
    its ``parent`` and time of creation (seconds since the epoch) when
    it is redefined."""
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    if parent is not None:
        ET.SubElement(ET.SubElement(root, "parent"), "name").text = parent
    if created is not None:
        ET.SubElement(root, "creationTime").text = str(created)
    element = ET.SubElement(root, "disks")
    # A redefinition names the bitmap that exists; libvirt names a new
    # one after the checkpoint.
    for target in disks:
        disk = ET.SubElement(element, "disk", name=target,
                             checkpoint="bitmap")
        if created is not None:
            disk.set("bitmap", name)
    for target in others:
        ET.SubElement(element, "disk", name=target, checkpoint="no")
    return ET.tostring(root, encoding="unicode")
