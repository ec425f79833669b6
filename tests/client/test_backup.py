"""Incremental backup: a full backup, then two incrementals with writes,
discards and zeroed ranges between them, each restoring the disk exactly
as it was at its point, against both daemons over the UNIX socket and
TLS.

The disk is a qcow2 exported by qemu-nbd behind an NBD ticket, as vdsm
serves a backup; a dirty bitmap per checkpoint is made with ``qemu-img
bitmap --add``. Every comparison is ``qemu-img compare``."""

import subprocess

import pytest

import nbd_servers
from diskferry import client
from nbd_servers import qemu_img, qemu_io
from servers import ticket_dict

from .helpers import MiB

SIZE = 16 * MiB

ROUTES = [("diskferry", "auto"), ("diskferry", "never"),
          ("ovirt-imageio", "auto"), ("ovirt-imageio", "never")]


def compare(a, b):
    proc = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def snapshot(disk, path):
    qemu_img("convert", "-U", "-f", "qcow2", "-O", "raw", disk, path)
    return path


class Backup:
    """Back up ``disk`` through daemon ``srv``, one ticket per backup."""

    def __init__(self, srv, unix, disk):
        self.srv = srv
        self.unix = unix
        self.disk = disk

    def download(self, out, bitmap=None, backing=None):
        with nbd_servers.start_export("qemu-nbd", self.disk, fmt="qcow2",
                                      read_only=True,
                                      bitmap=bitmap) as export:
            t = ticket_dict("/unused", SIZE, ("read",), url=export.url,
                            dirty=bitmap is not None)
            self.srv.add_ticket(t)
            try:
                return client.download(
                    self.srv.image_url(t["uuid"]), out,
                    cafile=self.srv.ca_file, unix=self.unix, format="qcow2",
                    backing_file=backing, incremental=bitmap is not None)
            finally:
                self.srv.control("DELETE", f"/tickets/{t['uuid']}")


@pytest.mark.parametrize("kind,unix", ROUTES,
                         ids=[f"{k}-{'unix' if u == 'auto' else 'tls'}"
                              for k, u in ROUTES])
def test_full_then_two_incrementals_restore_exactly(daemons, make_ticket,
                                                    tmp_path, kind, unix):
    srv = daemons.get(kind)
    disk = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", disk, SIZE)
    qemu_io(disk, "qcow2", "write -P 0x11 0 6M", "write -P 0x12 10M 2M")
    backup = Backup(srv, unix, disk)

    # Full backup, and the bitmap that tracks what changes after it.
    full = tmp_path / "full.qcow2"
    backup.download(full)
    qemu_img("bitmap", "--add", disk, "b1")
    compare(full, snapshot(disk, tmp_path / "at-full.raw"))

    # Writes, a discard, a zeroed range: incremental 1.
    qemu_io(disk, "qcow2", "write -P 0x21 1M 64k", "discard 2M 1M",
            "write -z 4M 512k", "write -P 0x22 14M 1M")
    inc1 = tmp_path / "inc1.qcow2"
    result = backup.download(inc1, bitmap="b1", backing=full)
    qemu_img("bitmap", "--add", disk, "b2")
    at_inc1 = snapshot(disk, tmp_path / "at-inc1.raw")
    compare(inc1, at_inc1)
    # Only the dirty ranges were moved.
    assert result.data_bytes <= 2 * MiB
    assert '"backing-filename": "full.qcow2"' in qemu_img(
        "info", "--output=json", inc1)

    # More changes, some over the same ranges: incremental 2.
    qemu_io(disk, "qcow2", "write -P 0x31 1M 32k", "write -z 10M 1M",
            "discard 0 64k", "write -P 0x32 8M 64k")
    inc2 = tmp_path / "inc2.qcow2"
    backup.download(inc2, bitmap="b2", backing=inc1)
    at_inc2 = snapshot(disk, tmp_path / "at-inc2.raw")
    compare(inc2, at_inc2)
    # Each point of the chain still reads as it did.
    compare(inc1, at_inc1)

    # Restore: upload the newest overlay with its chain to a new disk.
    restored = tmp_path / "restored.raw"
    restored.write_bytes(b"\xee" * SIZE)
    t = make_ticket(srv, restored, SIZE)
    client.upload(inc2, srv.image_url(t["uuid"]), cafile=srv.ca_file,
                  unix=unix)
    assert restored.read_bytes() == at_inc2.read_bytes()


def test_incremental_of_a_ticket_that_is_not_dirty(daemons, tmp_path):
    srv = daemons.get("diskferry")
    disk = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", disk, SIZE)
    full = tmp_path / "full.qcow2"
    qemu_img("create", "-f", "qcow2", full, SIZE)
    with nbd_servers.start_export("qemu-nbd", disk, fmt="qcow2",
                                  read_only=True) as export:
        t = ticket_dict("/unused", SIZE, ("read",), url=export.url)
        srv.add_ticket(t)
        with pytest.raises(client.TransferError,
                           match="without --incremental"):
            client.download(srv.image_url(t["uuid"]), tmp_path / "inc.qcow2",
                            cafile=srv.ca_file, format="qcow2",
                            backing_file=full, incremental=True)
    assert not (tmp_path / "inc.qcow2").exists()
    assert not (tmp_path / "inc.qcow2.part").exists()
