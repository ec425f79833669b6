"""Pruning the checkpoints a domain's backups made.

Every checkpoint keeps an enabled bitmap in each qcow2 disk: QEMU marks
every one of them on every write, and each takes room in the image. A
domain backed up every night wants only the newest few, the ones its
next incremental backup may start from. Only the checkpoints this daemon
made (``diskferry-`` and the time) are pruned, oldest first; others are
somebody else's.

A running domain's checkpoint is deleted by libvirt, bitmaps and all.
libvirt 9.0 deletes none of an inactive domain ("cannot delete checkpoint
for inactive domain"): the daemon removes the bitmaps from the disk
files itself (``qemu-img bitmap --remove``), then libvirt's record
(``checkpoint-delete --metadata``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from diskferry.daemon.backup.job import CHECKPOINT_PREFIX
from diskferry.daemon.backup.libvirt import (
    SHUT_OFF,
    DomainDisk,
    LibvirtError,
    Virsh,
)
from diskferry.daemon.backup.offline import remove_bitmap
from diskferry.errors import Conflict

log = logging.getLogger("diskferry.daemon.backup")


@dataclass(frozen=True)
class Pruned:
    """What a prune removed and kept, oldest first."""

    domain: str
    removed: list[str]
    kept: list[str]

    def describe(self) -> dict[str, object]:
        return {"domain": self.domain, "removed": self.removed,
                "kept": self.kept}


def prune(virsh: Virsh, domain: str, keep: int) -> Pruned:
    """Delete the domain's checkpoints of this daemon but the newest
    ``keep``; the caller makes sure no backup of it runs."""
    shut_off = virsh.state(domain) == SHUT_OFF
    ours = sorted(name for name in virsh.checkpoints(domain)
                  if name.startswith(CHECKPOINT_PREFIX))
    cut = max(len(ours) - keep, 0)
    if not shut_off and cut and virsh.job_running(domain):
        raise Conflict(f"A job runs on domain {domain!r} (virsh "
                       f"domjobinfo); prune after it ends")
    disks = {d.target: d for d in virsh.disks(domain)} if shut_off else {}
    for name in ours[:cut]:
        if shut_off:
            _remove_offline(virsh, domain, name, disks)
        else:
            _remove_running(virsh, domain, name)
        log.info("backup of %s: checkpoint %s deleted", domain, name)
    return Pruned(domain, ours[:cut], ours[cut:])


def _remove_running(virsh: Virsh, domain: str, name: str) -> None:
    try:
        virsh.delete_checkpoint(domain, name)
    except LibvirtError as e:
        # A domain killed (virsh destroy) before QEMU stored its
        # bitmaps leaves checkpoints without them: libvirt then deletes
        # none ("bitmap ... not found in backing chain"); its record is
        # all there is left.
        if "not found" not in str(e):
            raise
        log.warning("backup of %s: checkpoint %s has no bitmap left (%s); "
                    "deleting its record", domain, name, e)
        virsh.delete_checkpoint(domain, name, metadata_only=True)


def _remove_offline(virsh: Virsh, domain: str, name: str,
                    disks: dict[str, DomainDisk]) -> None:
    for target, bitmap in virsh.checkpoint_bitmaps(domain, name).items():
        disk = disks.get(target)
        if disk is not None:
            remove_bitmap(disk, bitmap)
    virsh.delete_checkpoint(domain, name, metadata_only=True)
