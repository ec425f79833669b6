"""Interop: the ovirt_imageio.client library (ovirt-imageio 2.5.1) uploads
and downloads raw and qcow2 images through the daemon.

The client sends OPTIONS, and when the server is on the same host and
advertises ``unix_socket`` it moves the data over that UNIX socket by
itself.  The "unix" variants check on the server side (its request log)
that the data requests really arrived on the local service; the "tls"
variants run against a daemon with the local service disabled and check
that they arrived on the remote service.

Each test runs against ovirt-imageio too, which proves the test itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid

import pytest
from ovirt_imageio import client

import nbd_servers
from servers import make_sparse_file, ticket_dict

MiB = 1 << 20
SIZE = 64 * MiB

KINDS = ("ovirt-imageio", "diskferry")
VARIANTS = [(k, v) for k in KINDS for v in ("tls", "unix")]
IDS = [f"{k}-{v}" for k, v in VARIANTS]

# A line of the request log for an I/O request of the transfer, on the
# local service or the remote one; both daemons write "local" for the
# UNIX socket and the peer address for TCP.
LOCAL_MARK = re.compile(r"\[local[/\]]")
REMOTE_MARK = re.compile(r"127\.0\.0\.1")


@pytest.fixture(scope="module")
def raw_image(tmp_path_factory):
    """A raw image with data, allocated zeros and holes."""
    d = tmp_path_factory.mktemp("interop-src")
    return make_sparse_file(
        d / "source.raw",
        SIZE,
        {
            0: os.urandom(MiB),
            5 * MiB + 4096: os.urandom(3 * MiB),
            20 * MiB: bytes(2 * MiB),
            40 * MiB + 512: os.urandom(12345 * 512),
            SIZE - MiB: os.urandom(MiB),
        },
    )


@pytest.fixture(scope="module")
def qcow2_image(raw_image, tmp_path_factory):
    d = tmp_path_factory.mktemp("interop-qcow2")
    path = d / "source.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw_image, path],
        check=True,
    )
    return path


def qemu_img_compare(a, b, fmt_a, fmt_b):
    r = subprocess.run(
        ["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"images differ: {r.stdout}{r.stderr}"


def qemu_img_info(path):
    import json

    r = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(r.stdout)


def daemon_for(daemons, kind, variant):
    if variant == "unix":
        return daemons.get(kind, local_socket="abstract")
    return daemons.get(kind, local_socket=None)


def io_lines(srv, marker, log_start):
    text = srv.log_text()[log_start:]
    return [line for line in text.splitlines() if marker in line]


def check_transport(srv, variant, marker, log_start):
    lines = io_lines(srv, marker, log_start)
    assert lines, f"no request of transfer {marker} in the {srv.name} log"
    local = [line for line in lines if LOCAL_MARK.search(line)]
    remote = [line for line in lines if REMOTE_MARK.search(line)]
    if variant == "unix":
        assert local, "no request arrived on the UNIX socket:\n" + "\n".join(lines)
        # Only the first OPTIONS (which finds the socket) goes over TCP.
        assert all("OPTIONS" in line for line in remote), "\n".join(lines)
    else:
        assert remote and not local, "\n".join(lines)


def add_ticket(srv, path, size, ops, make_ticket_cleanup):
    marker = f"interop-{uuid.uuid4().hex[:12]}"
    t = ticket_dict(path, size, ops, transfer_id=marker)
    srv.add_ticket(t)
    make_ticket_cleanup.append((srv, t["uuid"]))
    return t, marker


@pytest.fixture
def cleanup():
    added = []
    yield added
    for srv, tid in added:
        if srv.alive():
            srv.control("DELETE", f"/tickets/{tid}")


@pytest.mark.parametrize("kind,variant", VARIANTS, ids=IDS)
def test_upload_raw(daemons, kind, variant, raw_image, tmp_path, cleanup):
    srv = daemon_for(daemons, kind, variant)
    target = make_sparse_file(tmp_path / "target.raw", SIZE)
    t, marker = add_ticket(srv, target, SIZE, ["write"], cleanup)
    log_start = len(srv.log_text())
    client.upload(str(raw_image), srv.image_url(t["uuid"]), srv.ca_file)
    assert target.read_bytes() == raw_image.read_bytes()
    check_transport(srv, variant, marker, log_start)


@pytest.mark.parametrize("kind,variant", VARIANTS, ids=IDS)
def test_upload_qcow2(
    daemons, kind, variant, raw_image, qcow2_image, tmp_path, cleanup
):
    srv = daemon_for(daemons, kind, variant)
    target = make_sparse_file(tmp_path / "target.raw", SIZE)
    t, marker = add_ticket(srv, target, SIZE, ["write"], cleanup)
    log_start = len(srv.log_text())
    client.upload(str(qcow2_image), srv.image_url(t["uuid"]), srv.ca_file)
    qemu_img_compare(qcow2_image, target, "qcow2", "raw")
    assert target.read_bytes() == raw_image.read_bytes()
    check_transport(srv, variant, marker, log_start)


@pytest.mark.parametrize("kind,variant", VARIANTS, ids=IDS)
def test_download_raw(daemons, kind, variant, raw_image, tmp_path, cleanup):
    srv = daemon_for(daemons, kind, variant)
    t, marker = add_ticket(srv, raw_image, SIZE, ["read"], cleanup)
    out = tmp_path / "download.raw"
    log_start = len(srv.log_text())
    client.download(srv.image_url(t["uuid"]), str(out), srv.ca_file, fmt="raw")
    assert out.stat().st_size == SIZE
    assert out.read_bytes() == raw_image.read_bytes()
    check_transport(srv, variant, marker, log_start)


@pytest.mark.parametrize("kind,variant", VARIANTS, ids=IDS)
def test_download_qcow2(daemons, kind, variant, raw_image, tmp_path, cleanup):
    srv = daemon_for(daemons, kind, variant)
    t, marker = add_ticket(srv, raw_image, SIZE, ["read"], cleanup)
    out = tmp_path / "download.qcow2"
    log_start = len(srv.log_text())
    client.download(srv.image_url(t["uuid"]), str(out), srv.ca_file, fmt="qcow2")
    info = qemu_img_info(out)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == SIZE
    qemu_img_compare(out, raw_image, "qcow2", "raw")
    check_transport(srv, variant, marker, log_start)


@pytest.mark.parametrize("kind,variant", VARIANTS, ids=IDS)
def test_upload_qcow2_then_download_qcow2(
    daemons, kind, variant, qcow2_image, tmp_path, cleanup
):
    """Round trip through the daemon: what comes back is the same disk."""
    srv = daemon_for(daemons, kind, variant)
    target = make_sparse_file(tmp_path / "target.raw", SIZE)
    t, _ = add_ticket(srv, target, SIZE, ["read", "write"], cleanup)
    url = srv.image_url(t["uuid"])
    client.upload(str(qcow2_image), url, srv.ca_file)
    out = tmp_path / "back.qcow2"
    client.download(url, str(out), srv.ca_file, fmt="qcow2")
    qemu_img_compare(qcow2_image, out, "qcow2", "qcow2")


# --- NBD tickets: the image is a qcow2 volume exported by qemu-nbd, as vdsm
# serves every volume and backup.


def nbd_ticket(srv, export, size, ops, cleanup):
    marker = f"interop-{uuid.uuid4().hex[:12]}"
    t = ticket_dict("/unused", size, ops, transfer_id=marker, url=export.url)
    srv.add_ticket(t)
    cleanup.append((srv, t["uuid"]))
    return t, marker


@pytest.mark.parametrize("kind,variant", VARIANTS, ids=IDS)
def test_upload_qcow2_into_nbd_volume(
    daemons, kind, variant, raw_image, qcow2_image, tmp_path, cleanup
):
    """The virt-v2v import: a disk uploaded into a new thin qcow2 volume."""
    srv = daemon_for(daemons, kind, variant)
    volume = tmp_path / "volume.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", volume,
                    str(SIZE)], check=True)
    export = nbd_servers.start_export("qemu-nbd", volume, fmt="qcow2")
    try:
        t, marker = nbd_ticket(srv, export, SIZE, ["write"], cleanup)
        log_start = len(srv.log_text())
        client.upload(str(qcow2_image), srv.image_url(t["uuid"]), srv.ca_file)
        check_transport(srv, variant, marker, log_start)
    finally:
        export.stop()
    qemu_img_compare(raw_image, volume, "raw", "qcow2")
    # Holes stay holes: far less is allocated than the disk's size.
    assert qemu_img_info(volume)["actual-size"] < SIZE // 2


@pytest.mark.parametrize("kind,variant", VARIANTS, ids=IDS)
def test_download_nbd_volume(
    daemons, kind, variant, raw_image, qcow2_image, tmp_path, cleanup
):
    srv = daemon_for(daemons, kind, variant)
    export = nbd_servers.start_export("qemu-nbd", qcow2_image, fmt="qcow2",
                                      read_only=True)
    try:
        t, marker = nbd_ticket(srv, export, SIZE, ["read"], cleanup)
        out = tmp_path / "download.qcow2"
        log_start = len(srv.log_text())
        client.download(srv.image_url(t["uuid"]), str(out), srv.ca_file,
                        fmt="qcow2")
        check_transport(srv, variant, marker, log_start)
    finally:
        export.stop()
    qemu_img_compare(out, raw_image, "qcow2", "raw")
