"""Backups of a shut off domain: its disk files, served by the daemon.

No QEMU runs to serve a pull-mode backup, and none is needed: the disk
files do not change while the domain is off. Each disk is served as a
format ticket is (``daemon.exports``: a private, read-only qemu-nbd,
whose lock keeps the domain from starting while it serves), and an
incremental backup is the persistent bitmap of the checkpoint it starts
from (libvirt names a checkpoint's bitmap after it) as the dirty
context.

The new checkpoint is made by hand: libvirt 9 refuses to make one of an
inactive domain ("cannot create checkpoint for inactive domain"), but
takes the metadata of an existing one (``checkpoint-create
--redefine``). So the daemon adds the bitmap to each qcow2 disk
(``qemu-img bitmap --add``: empty and enabled, as libvirt's own, so it
records every write from now on), then redefines the checkpoint, with
the newest one as its parent, as libvirt would have made it. A domain
that starts later, and its next backup, find both as usual.
"""

from __future__ import annotations

import time
import urllib.parse
import uuid
from collections.abc import Sequence

from diskferry.client import formats
from diskferry.client.errors import UnsupportedFormat
from diskferry.daemon.backup.job import BackupDisk
from diskferry.daemon.backup.libvirt import DomainDisk, Virsh, checkpoint_xml
from diskferry.daemon.exports import image_bitmaps
from diskferry.errors import BadRequest, Conflict


def offline_disks(domain: str, chosen: Sequence[DomainDisk],
                  since: str | None) -> list[BackupDisk]:
    """The disks to serve, each checked as qemu reads it (its format,
    the bitmap of ``since``), before anything is changed."""
    disks = []
    for disk in chosen:
        source = _open(disk, f"Disk {disk.target!r} of domain {domain!r}")
        if since is not None:
            bitmaps = image_bitmaps(source.chain[0])
            if since not in bitmaps:
                raise BadRequest(
                    f"Disk {disk.target!r} of domain {domain!r} has no "
                    f"bitmap of checkpoint {since!r} (its bitmaps: "
                    f"{', '.join(bitmaps) or 'none'})")
        disks.append(BackupDisk(
            name=disk.target, ticket_id=str(uuid.uuid4()), size=source.size,
            url="file://" + urllib.parse.quote(disk.source),
            dirty=since is not None, format=disk.format, bitmap=since))
    return disks


def add_checkpoint(virsh: Virsh, domain: str, name: str,
                   tracked: Sequence[DomainDisk],
                   others: Sequence[str]) -> None:
    """Make checkpoint ``name`` of a shut off domain: a bitmap in each
    ``tracked`` disk, and libvirt's metadata; nothing of it if it fails."""
    known = virsh.checkpoints(domain)
    added: list[DomainDisk] = []
    try:
        for disk in tracked:
            _bitmap(disk, "--add", name)
            added.append(disk)
        virsh.redefine_checkpoint(domain, checkpoint_xml(
            name, [d.target for d in tracked], others,
            parent=known[-1] if known else None, created=int(time.time())))
    except BaseException:
        for disk in added:
            try:
                _bitmap(disk, "--remove", name)
            except Conflict:
                pass
        raise


def remove_bitmap(disk: DomainDisk, name: str) -> None:
    """Remove bitmap ``name`` from a shut off domain's disk, if it has
    one."""
    source = _open(disk, f"Disk {disk.target!r}")
    if name in image_bitmaps(source.chain[0]):
        _bitmap(disk, "--remove", name)


def _open(disk: DomainDisk, named: str) -> formats.Source:
    """The disk file as qemu reads it; a 400 starting with ``named`` if
    it cannot."""
    try:
        return formats.open_source(disk.source, disk.format)
    except UnsupportedFormat as e:
        raise BadRequest(f"{named}: {e}") from e


def _bitmap(disk: DomainDisk, action: str, name: str) -> None:
    try:
        formats.run_qemu_img("bitmap", action, "-f", disk.format,
                             disk.source, name)
    except (OSError, RuntimeError) as e:
        hint = ""
        if "lock" in str(e):
            hint = " (the domain started, or another program uses the disk)"
        raise Conflict(f"Disk {disk.target!r} ({disk.source}): qemu-img "
                       f"bitmap {action} {name}: {e}{hint}") from e
