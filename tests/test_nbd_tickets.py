"""NBD tickets beyond the conformance suite: allocation depth, dirty
extents for incremental backup, multi-conn, failures of the NBD server.

The images API tests that run on files also run on NBD exports
(tests/conformance, ``all_storages``); these cover what only NBD has.
Where both daemons must answer alike the test runs on both: the answer of
ovirt-imageio 2.5.1 proves the test.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess

import pytest

import nbd_servers
from nbd_servers import qemu_img, qemu_io
from servers import ticket_dict

MiB = 1 << 20
SIZE = 16 * MiB


def add_nbd_ticket(srv, export, size=SIZE, ops=("read",), **extra):
    t = ticket_dict("/unused", size, ops, url=export.url, **extra)
    srv.add_ticket(t)
    return t


def get_json(con, path):
    con.request("GET", path)
    res = con.getresponse()
    body = res.read()
    assert res.status == 200, body
    return json.loads(body)


def export_extents(srv, image, query="", ticket=None, **export_options):
    """The extents a daemon reports for ``image`` exported by qemu-nbd."""
    with nbd_servers.start_export("qemu-nbd", image, read_only=True,
                                  **export_options) as export:
        t = add_nbd_ticket(srv, export, **(ticket or {}))
        con = srv.remote_connection()
        try:
            return get_json(con, f"/images/{t['uuid']}/extents{query}")
        finally:
            con.close()


def compact(extents, *keys):
    return [(e["start"], e["length"], *(e[k] for k in keys)) for e in extents]


@pytest.fixture
def overlay(tmp_path):
    """A qcow2 overlay over a qcow2 base: data in both layers, some only
    in the base, the rest unallocated in the whole chain."""
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, SIZE)
    qemu_io(base, "qcow2", "write -P 0xaa 0 2M", "write -P 0xbb 8M 1M")
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    qemu_io(top, "qcow2", "write -P 0xcc 1M 2M", "write -z 12M 1M")
    return top


@pytest.mark.parametrize("kind", ["ovirt-imageio", "diskferry"])
def test_zero_extents_holes_from_allocation_depth(daemons, kind, overlay):
    """``hole`` is what no layer of the chain allocates; the base's data
    and the top's zeroed cluster are not holes."""
    extents = export_extents(daemons.get(kind), overlay, fmt="qcow2")
    assert compact(extents, "zero", "hole") == [
        (0, 3 * MiB, False, False),          # base 0-2M, top 1M-3M
        (3 * MiB, 5 * MiB, True, True),
        (8 * MiB, MiB, False, False),        # base only
        (9 * MiB, 3 * MiB, True, True),
        (12 * MiB, MiB, True, False),        # zeroed in the top layer
        (13 * MiB, 3 * MiB, True, True),
    ]


@pytest.mark.parametrize("kind", ["ovirt-imageio", "diskferry"])
def test_single_layer_holes(daemons, kind, overlay):
    """Exported alone (``"backing": null``, how a snapshot is backed up
    layer by layer), what only the base holds is a hole of this layer."""
    spec = json.dumps({"driver": "qcow2", "backing": None,
                       "file": {"driver": "file", "filename": str(overlay)}})
    extents = export_extents(daemons.get(kind), f"json:{spec}", fmt=None,
                             allocation_depth=True)
    assert compact(extents, "zero", "hole") == [
        (0, MiB, True, True),
        (MiB, 2 * MiB, False, False),
        (3 * MiB, 9 * MiB, True, True),
        (12 * MiB, MiB, True, False),
        (13 * MiB, 3 * MiB, True, True),
    ]


@pytest.fixture
def backup_disk(tmp_path):
    """A qcow2 with data, a bitmap added, then known writes after it."""
    disk = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", disk, SIZE)
    qemu_io(disk, "qcow2", "write -P 0x11 0 4M")
    qemu_img("bitmap", "--add", disk, "checkpoint-1")
    qemu_io(disk, "qcow2", "write -P 0x22 1M 64k", "write -P 0x33 6M 1M",
            "write -z 2M 64k")
    return disk


@pytest.mark.parametrize("kind", ["ovirt-imageio", "diskferry"])
def test_dirty_extents_follow_the_bitmap(daemons, kind, backup_disk):
    srv = daemons.get(kind)
    with nbd_servers.start_export("qemu-nbd", backup_disk, fmt="qcow2",
                                  read_only=True,
                                  bitmap="checkpoint-1") as export:
        t = add_nbd_ticket(srv, export, dirty=True)
        con = srv.remote_connection()
        dirty = get_json(con, f"/images/{t['uuid']}/extents?context=dirty")
        zero = get_json(con, f"/images/{t['uuid']}/extents?context=zero")
        con.close()
    # Dirty granularity is the bitmap's (64 KiB); the zeroed range is dirty
    # too and reads as zeros.
    assert compact(dirty, "dirty", "zero") == [
        (0, MiB, False, False),
        (MiB, 64 * 1024, True, False),
        (MiB + 64 * 1024, MiB - 64 * 1024, False, False),
        (2 * MiB, 64 * 1024, True, True),
        (2 * MiB + 64 * 1024, 2 * MiB - 64 * 1024, False, False),
        (4 * MiB, 2 * MiB, False, True),
        (6 * MiB, MiB, True, False),
        (7 * MiB, SIZE - 7 * MiB, False, True),
    ]
    assert all(set(e) == {"start", "length", "dirty", "zero"} for e in dirty)
    assert all(set(e) == {"start", "length", "zero", "hole"} for e in zero)


@pytest.mark.parametrize("kind", ["ovirt-imageio", "diskferry"])
def test_dirty_extents_need_a_dirty_ticket(daemons, kind, backup_disk):
    srv = daemons.get(kind)
    with nbd_servers.start_export("qemu-nbd", backup_disk, fmt="qcow2",
                                  read_only=True,
                                  bitmap="checkpoint-1") as export:
        t = add_nbd_ticket(srv, export)
        con = srv.remote_connection()
        con.request("GET", f"/images/{t['uuid']}/extents?context=dirty")
        res = con.getresponse()
        res.read()
        con.close()
    assert res.status == 404


@pytest.mark.parametrize("kind", ["ovirt-imageio", "diskferry"])
def test_dirty_ticket_without_bitmap_404(daemons, kind, tmp_path):
    """A dirty ticket on an export without a bitmap: the zero context is
    served, the dirty one is a 404."""
    srv = daemons.get(kind)
    disk = tmp_path / "plain.raw"
    disk.write_bytes(os.urandom(MiB))
    with nbd_servers.start_export("qemu-nbd", disk) as export:
        t = add_nbd_ticket(srv, export, size=MiB, dirty=True)
        con = srv.remote_connection()
        zero = get_json(con, f"/images/{t['uuid']}/extents")
        con.request("GET", f"/images/{t['uuid']}/extents?context=dirty")
        res = con.getresponse()
        body = res.read()
        con.close()
    assert compact(zero, "zero") == [(0, MiB, False)]
    assert res.status == 404, body


@pytest.mark.parametrize("shared,connections", [(1, 1), (8, 8)])
def test_max_readers_and_writers_follow_multi_conn(daemons, tmp_path, shared,
                                                   connections):
    """qemu-nbd offers NBD_FLAG_CAN_MULTI_CONN only with --shared > 1;
    without it one connection may use the export (ovirt-imageio says 8
    either way)."""
    srv = daemons.get("diskferry")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(MiB))
    with nbd_servers.start_export("qemu-nbd", disk, shared=shared) as export:
        t = add_nbd_ticket(srv, export, size=MiB, ops=("read", "write"))
        con = srv.remote_connection()
        con.request("OPTIONS", f"/images/{t['uuid']}")
        res = con.getresponse()
        body = json.loads(res.read())
        con.close()
    assert (body["max_readers"], body["max_writers"]) == (connections,
                                                         connections)


@pytest.mark.parametrize("url", [
    "nbd:foo", "nbd:unix:", "nbd://", "nbd:unix:relative.sock",
    "nbd+unix:///export", "nbd:localhost:notaport",
])
def test_malformed_nbd_url_refused_when_installed(daemons, url):
    """ovirt-imageio accepts these and fails every request with 500."""
    srv = daemons.get("diskferry")
    t = ticket_dict("/unused", MiB, url=url)
    status, _, body = srv.control("PUT", f"/tickets/{t['uuid']}", body=t)
    assert status == 400, body
    assert b"url" in body


def test_unreachable_export_is_a_server_error(daemons, tmp_path):
    srv = daemons.get("diskferry")
    t = ticket_dict("/unused", MiB, url=f"nbd:unix:{tmp_path}/nothing.sock")
    srv.add_ticket(t)
    con = srv.remote_connection()
    con.request("OPTIONS", f"/images/{t['uuid']}")
    res = con.getresponse()
    body = res.read()
    con.close()
    assert res.status == 500
    assert b"Cannot open" in body


def connect(srv, transport):
    """TLS goes through the buffer, the local socket through pipes."""
    if transport == "tls":
        return srv.remote_connection()
    return srv.local_connection()


@pytest.mark.parametrize("transport", ["tls", "local"])
def test_server_killed_midway_then_back(daemons, tmp_path, transport):
    """An NBD server that dies mid-request fails that request (never a
    short success); once it is back, the same ticket serves again."""
    srv = daemons.get("diskferry")
    disk = tmp_path / "disk.raw"
    data = os.urandom(64 * MiB)
    disk.write_bytes(data)
    sock = str(tmp_path / "export.sock")
    export = nbd_servers.start_export(
        "qemu-nbd", disk, sock=sock, read_only=True)
    try:
        t = add_nbd_ticket(srv, export, size=len(data))
        con = connect(srv, transport)
        con.request("GET", f"/images/{t['uuid']}")
        res = con.getresponse()
        assert res.status == 200
        res.read(MiB)
        export.kill()
        # The daemon cannot answer an error after the status line: it
        # closes the connection and the body is cut short.
        with pytest.raises(http.client.IncompleteRead):
            res.read()
        con.close()
    finally:
        export.stop()
    with nbd_servers.start_export("qemu-nbd", disk, sock=sock,
                                  read_only=True):
        con = connect(srv, transport)
        con.request("GET", f"/images/{t['uuid']}",
                    headers={"Range": f"bytes={32 * MiB}-{33 * MiB - 1}"})
        res = con.getresponse()
        body = res.read()
        con.close()
    assert res.status == 206
    assert body == data[32 * MiB:33 * MiB]


@pytest.mark.parametrize("transport", ["tls", "local"])
def test_server_killed_during_put_is_not_acknowledged(daemons, tmp_path,
                                                      transport):
    """The PUT is never answered 200; the daemon serves the next request
    once the export is back."""
    srv = daemons.get("diskferry")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(64 * MiB))
    sock = str(tmp_path / "export.sock")
    export = nbd_servers.start_export("qemu-nbd", disk, sock=sock)
    status = None
    try:
        t = add_nbd_ticket(srv, export, size=64 * MiB, ops=("read", "write"))
        con = connect(srv, transport)
        con.putrequest("PUT", f"/images/{t['uuid']}")
        con.putheader("Content-Length", str(64 * MiB))
        con.endheaders()
        con.send(os.urandom(8 * MiB))
        export.kill()
        try:
            for _ in range(56):
                con.send(os.urandom(MiB))
            status = con.getresponse().status
        except (OSError, http.client.HTTPException):
            pass  # the daemon closed the connection
        con.close()
    finally:
        export.stop()
    assert status != 200
    with nbd_servers.start_export("qemu-nbd", disk, sock=sock):
        con = connect(srv, transport)
        con.request("PUT", f"/images/{t['uuid']}", body=b"x" * 4096,
                    headers={"Content-Range": "bytes 4096-8191/*"})
        res = con.getresponse()
        res.read()
        con.close()
    assert res.status == 200
    with open(disk, "rb") as f:
        f.seek(4096)
        assert f.read(4096) == b"x" * 4096


@pytest.mark.parametrize("transport", ["tls", "local"])
def test_large_put_sent_in_small_pieces_then_get(daemons, tmp_path,
                                                 transport):
    """A body that arrives in many small packets fills a pipe's slots
    with little data each: the spliced PUT must keep moving it (this hung
    once, with a pipe expected to hold a whole chunk)."""
    srv = daemons.get("diskferry")
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk,
                    str(32 * MiB)], check=True)
    data = os.urandom(24 * MiB + 4096)
    with nbd_servers.start_export("qemu-nbd", disk, fmt="qcow2") as export:
        t = add_nbd_ticket(srv, export, size=32 * MiB, ops=("read", "write"))
        con = connect(srv, transport)
        con.putrequest("PUT", f"/images/{t['uuid']}")
        con.putheader("Content-Range", f"bytes 4096-{4096 + len(data) - 1}/*")
        con.putheader("Content-Length", str(len(data)))
        con.endheaders()
        view = memoryview(data)
        for pos in range(0, len(data), 1500):
            con.send(view[pos:pos + 1500])
        res = con.getresponse()
        res.read()
        assert res.status == 200
        con.request("GET", f"/images/{t['uuid']}",
                    headers={"Range": f"bytes=4096-{4096 + len(data) - 1}"})
        res = con.getresponse()
        body = res.read()
        con.close()
    assert res.status == 206
    assert body == data


def test_options_of_a_read_only_export_offer_no_writes(daemons, tmp_path):
    """A write ticket on an export served read-only: OPTIONS offers what
    the export can do (no PUT, PATCH, zero or flush), not what the ticket
    says."""
    srv = daemons.get("diskferry")
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(MiB))
    with nbd_servers.start_export("qemu-nbd", image, read_only=True) as export:
        t = add_nbd_ticket(srv, export, size=MiB, ops=("read", "write"))
        con = srv.remote_connection()
        try:
            con.request("OPTIONS", f"/images/{t['uuid']}")
            res = con.getresponse()
            body = json.loads(res.read())
        finally:
            con.close()
    assert res.status == 200
    assert res.getheader("Allow") == "OPTIONS,GET,HEAD"
    assert set(body["features"]) == {"extents", "checksum"}
