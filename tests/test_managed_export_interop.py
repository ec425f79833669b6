"""Existing clients through format tickets, unchanged: the
ovirt_imageio.client library (ovirt-imageio 2.5.1) uploads, downloads,
and takes a full and two incremental backups of a qcow2 disk that the
daemon serves through its own qemu-nbd, over TLS and over the UNIX
socket (which the library finds by itself from OPTIONS).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from ovirt_imageio import client

from nbd_servers import qemu_img, qemu_io
from servers import make_sparse_file, ticket_dict

MiB = 1 << 20
SIZE = 64 * MiB


@pytest.fixture(params=["tls", "unix"])
def srv(request, daemons):
    """The daemon with its local service (the library moves the data over
    the UNIX socket) or without (TLS only)."""
    local = "abstract" if request.param == "unix" else None
    return daemons.get("diskferry", local_socket=local)


@pytest.fixture
def tickets(srv):
    """add(path, ops, **fields) -> the ticket's URL; deleted at teardown,
    so that the image's export ends before the test looks at the image."""
    added = []

    def add(path, ops, **fields):
        t = ticket_dict(path, fields.pop("size", SIZE), ops, **fields)
        srv.add_ticket(t)
        added.append(t["uuid"])
        return srv.image_url(t["uuid"])

    add.done = lambda: [srv.delete_ticket(added.pop()) for _ in list(added)]
    yield add
    add.done()


def compare(a, b, fmt_a="qcow2", fmt_b="qcow2"):
    r = subprocess.run(["qemu-img", "compare", "-U", "-f", fmt_a, "-F", fmt_b,
                        str(a), str(b)], capture_output=True, text=True)
    assert r.returncode == 0, f"images differ: {r.stdout}{r.stderr}"


def info(path):
    return json.loads(qemu_img("info", "--output=json", "-U", path))


@pytest.fixture
def source(tmp_path):
    """A raw disk with data, allocated zeros and holes."""
    return make_sparse_file(tmp_path / "source.raw", SIZE, {
        0: os.urandom(MiB),
        5 * MiB + 4096: os.urandom(3 * MiB),
        20 * MiB: bytes(2 * MiB),
        SIZE - MiB: os.urandom(MiB),
    })


def test_upload_into_a_qcow2_volume(srv, tickets, source, tmp_path):
    """virt-v2v's import: an NBD reader of the source writes the disk
    through the images API into a new thin qcow2 volume."""
    volume = tmp_path / "volume.qcow2"
    qemu_img("create", "-f", "qcow2", volume, SIZE)
    url = tickets(volume, ["write"], format="qcow2", sparse=True)
    client.upload(str(source), url, srv.ca_file)
    tickets.done()
    qemu_img("check", volume)
    compare(source, volume, "raw", "qcow2")
    assert info(volume)["actual-size"] < SIZE // 2


def test_download_a_qcow2_chain(srv, tickets, source, tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", source, base)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    qemu_io(top, "qcow2", "write -P 0x61 2M 1M", "write -z 6M 1M")
    url = tickets(top, ["read"], format="qcow2")
    out = tmp_path / "download.qcow2"
    client.download(url, str(out), srv.ca_file, fmt="qcow2")
    compare(top, out)


def test_full_and_incremental_backups_restore(srv, tickets, source,
                                              tmp_path):
    disk = tmp_path / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", source, disk)
    full = tmp_path / "full.qcow2"
    client.download(tickets(disk, ["read"], format="qcow2"), str(full),
                    srv.ca_file, fmt="qcow2")
    tickets.done()
    qemu_img("bitmap", "--add", disk, "since-full")

    previous = full
    writes = [("write -P 0x22 1M 64k", "discard 8M 1M", "write -z 20M 512k",
               "write -P 0x23 40M 1M"),
              ("write -P 0x31 1M 32k", "write -z 32M 1M", "discard 0 64k")]
    for n, commands in enumerate(writes, 1):
        qemu_io(disk, "qcow2", *commands)
        url = tickets(disk, ["read"], format="qcow2", dirty=True,
                      bitmap="since-full" if n == 1 else f"since-inc{n - 1}")
        inc = tmp_path / f"inc{n}.qcow2"
        client.download(url, str(inc), srv.ca_file, fmt="qcow2",
                        incremental=True, backing_file=previous.name,
                        backing_format="qcow2")
        tickets.done()
        qemu_img("bitmap", "--add", disk, f"since-inc{n}")
        compare(disk, inc)
        assert os.path.getsize(inc) < 8 * MiB
        previous = inc

    # Restore: the newest backup, read through its chain, into a new
    # volume through a format ticket.
    restored = tmp_path / "restored.qcow2"
    qemu_img("create", "-f", "qcow2", restored, SIZE)
    client.upload(str(previous), tickets(restored, ["write"],
                                         format="qcow2"), srv.ca_file)
    tickets.done()
    qemu_img("check", restored)
    compare(disk, restored)
