"""``diskferry checksum``, ``info`` and ``map``: a local image and a
transfer URL seen without copying them."""

import json
import subprocess
import sys

import pytest

import nbd_servers
from diskferry import client
from nbd_servers import qemu_img, qemu_io
from servers import ticket_dict

from .helpers import KINDS, MiB, make_image

SIZE = 8 * MiB


def diskferry(*args):
    return subprocess.run([sys.executable, "-m", "diskferry", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(params=KINDS)
def transfer(request, daemons, make_ticket, tmp_path):
    srv = daemons.get(request.param)
    make_image(tmp_path / "img.raw", SIZE, "sparse")
    t = make_ticket(srv, tmp_path / "img.raw", SIZE, ops=["read"])
    return srv, srv.image_url(t["uuid"])


@pytest.mark.parametrize("algorithm,block_size", [
    (None, None), ("sha256", 1 * MiB)])
def test_checksum_is_the_servers(transfer, tmp_path, algorithm, block_size):
    srv, url = transfer
    args = []
    if algorithm:
        args += ["--algorithm", algorithm, "--block-size", "1M"]
    proc = diskferry("checksum", "--json", *args, tmp_path / "img.raw")
    assert proc.returncode == 0, proc.stderr
    local = json.loads(proc.stdout)
    with client.open(url, cafile=srv.ca_file) as sess:
        remote = sess.checksum(algorithm, block_size)
    assert local == remote
    human = diskferry("checksum", *args, tmp_path / "img.raw")
    assert human.stdout.startswith(f"{remote['checksum']}  ")


def test_checksum_of_a_qcow2_is_the_guest_disks(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, SIZE)
    qemu_io(image, "qcow2", "write -P 0x44 1M 2M")
    raw = tmp_path / "disk.raw"
    qemu_img("convert", "-O", "raw", image, raw)
    of_qcow2 = json.loads(diskferry("checksum", "--json", image).stdout)
    of_raw = json.loads(diskferry("checksum", "--json", raw).stdout)
    assert of_qcow2 == of_raw
    as_bytes = json.loads(diskferry("checksum", "--json", "--format", "raw",
                                    image).stdout)
    assert as_bytes["checksum"] != of_raw["checksum"]


@pytest.mark.parametrize("args,words", [
    (["nosuch.raw"], ["argument FILE", "nosuch.raw: no such file"]),
    (["--block-size", "1K", "{img}"], ["argument --block-size",
                                       "out of range"]),
    (["--algorithm", "crc", "{img}"], ["argument --algorithm"]),
])
def test_checksum_bad_arguments(tmp_path, args, words):
    img = tmp_path / "img.raw"
    img.write_bytes(b"\0" * MiB)
    proc = diskferry("checksum", *[a.format(img=img) for a in args])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr


@pytest.mark.parametrize("unix,transport", [("auto", "unix"),
                                            ("never", "tls")])
def test_info_says_the_transport_and_why(transfer, unix, transport):
    srv, url = transfer
    proc = diskferry("info", "--json", "--unix", unix, "--cafile",
                     srv.ca_file, url)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["size"] == SIZE
    assert info["transport"] == transport
    assert info["transport_reason"]
    assert "extents" in info["features"]
    assert info["max_readers"] >= 1
    human = diskferry("info", "--unix", unix, "--cafile", srv.ca_file, url)
    assert f"size:         {SIZE} (8.00 MiB)" in human.stdout
    assert f"transport:    {transport}" in human.stdout
    assert f"why:          {info['transport_reason']}" in human.stdout


def test_map_lists_the_servers_extents(transfer):
    srv, url = transfer
    proc = diskferry("map", "--json", "--cafile", srv.ca_file, url)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    with client.open(url, cafile=srv.ca_file) as sess:
        extents = list(sess.walk_extents("zero"))
    assert [(e["start"], e["length"], e["zero"]) for e in listed] == \
        [(e.start, e.length, e.zero) for e in extents]
    assert {e["type"] for e in listed} >= {"data"}
    assert sum(e["length"] for e in listed) == SIZE
    human = diskferry("map", "--cafile", srv.ca_file, url).stdout.splitlines()
    assert human[0].split() == ["start", "length", "size", "type"]
    rows = [line.split() for line in human[1:]]
    assert [(int(r[0]), int(r[1])) for r in rows] == \
        [(e.start, e.length) for e in extents]


def test_map_dirty_of_a_ticket_without_a_bitmap_fails_cleanly(transfer):
    srv, url = transfer
    proc = diskferry("map", "--context", "dirty", "--cafile", srv.ca_file,
                     url)
    assert proc.returncode == 1
    assert proc.stderr.startswith("diskferry map: error: ")
    assert "Traceback" not in proc.stderr


def test_map_dirty_lists_what_changed(daemons, tmp_path):
    srv = daemons.get("diskferry")
    disk = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", disk, SIZE)
    qemu_io(disk, "qcow2", "write -P 0x11 0 4M")
    qemu_img("bitmap", "--add", disk, "b1")
    qemu_io(disk, "qcow2", "write -P 0x22 1M 64k", "write -P 0x23 6M 1M")
    with nbd_servers.start_export("qemu-nbd", disk, fmt="qcow2",
                                  read_only=True, bitmap="b1") as export:
        t = ticket_dict("/unused", SIZE, ("read",), url=export.url,
                        dirty=True)
        srv.add_ticket(t)
        proc = diskferry("map", "--json", "--context", "dirty", "--cafile",
                         srv.ca_file, srv.image_url(t["uuid"]))
    assert proc.returncode == 0, proc.stderr
    dirty = [(e["start"], e["start"] + e["length"])
             for e in json.loads(proc.stdout) if e["dirty"]]
    assert dirty, proc.stdout
    # Every change is inside a dirty extent, and most of the disk is clean.
    for start, end in ((MiB, MiB + 64 * 1024), (6 * MiB, 7 * MiB)):
        assert any(s <= start and end <= e for s, e in dirty), dirty
    assert sum(e - s for s, e in dirty) < 4 * MiB
