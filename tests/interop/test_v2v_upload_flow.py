"""virt-v2v's upload flow into a format ticket: an NBD client writes the
guest's disk through the images API into a new qcow2 volume that the
daemon serves through its own qemu-nbd.

virt-v2v's ``-o rhv-upload`` needs an oVirt engine to create the disk
and the transfer, so it cannot run here; its data path can. nbdkit runs
an upload plugin (v2v_upload_plugin.py: OPTIONS, then PUT, PATCH zero
and PATCH flush over a pool of kept-alive connections, on the daemon's
UNIX socket when it advertises one, else over HTTPS), and ``qemu-img
convert`` or ``nbdcopy`` (what newer virt-v2v runs) writes the source
into it; ``qemu-img compare`` then reads it back through the plugin
(GET with Range). Once the ticket is deleted the volume must pass
``qemu-img check``, equal the source, and stay thin: zeros and holes
reached the daemon as PATCH zero, never as data; and no request of the
transfer failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from nbd_servers import qemu_img, qemu_io
from servers import make_sparse_file, ticket_dict

MiB = 1 << 20
SIZE = 64 * MiB
PLUGIN = Path(__file__).with_name("v2v_upload_plugin.py")

#: Guest data in the source; everything else is holes, zero clusters or
#: zeros written as data, which must reach the volume as zeros only.
DATA = {0: MiB, 5 * MiB + 4096: 3 * MiB, 40 * MiB + 512: 12345 * 512,
        SIZE - MiB: MiB}

#: What a volume may allocate beyond the data: a cluster at each edge of
#: each data run (qcow2's default cluster is 64 KiB).
CLUSTER_SLACK = 2 * 64 * 1024 * len(DATA)

#: How long nbdkit may take to load the plugin and ask the daemon.
NBDKIT_START_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A qcow2 guest disk with data, holes, zero clusters over former
    data, and zeros written as data."""
    d = tmp_path_factory.mktemp("v2v-source")
    raw = make_sparse_file(d / "source.raw", SIZE,
                           {off: os.urandom(n) for off, n in DATA.items()})
    path = d / "source.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, path)
    qemu_io(path, "qcow2", "write -P 0x5a 12M 2M", "write -z 12M 2M",
            "write -P 0 20M 2M")
    return path


@pytest.fixture(params=["unix", "tls"])
def srv(request, daemons):
    """With its local service, the plugin moves the data over the UNIX
    socket (virt-v2v on the daemon's host); without, over HTTPS."""
    local = "abstract" if request.param == "unix" else None
    return daemons.get("diskferry", local_socket=local)


@pytest.fixture
def volume(srv, tmp_path):
    """A new thin qcow2 volume behind a format ticket, as the engine makes
    for an import: (path, ticket); the test deletes the ticket."""
    path = tmp_path / "volume.qcow2"
    qemu_img("create", "-f", "qcow2", path, SIZE)
    t = ticket_dict(path, SIZE, ["write"], format="qcow2", sparse=True,
                    transfer_id=f"v2v-{uuid.uuid4().hex[:12]}")
    srv.add_ticket(t)
    yield path, t
    with contextlib.suppress(Exception):
        srv.delete_ticket(t["uuid"])


@contextlib.contextmanager
def upload_plugin(srv, ticket_id, log):
    """nbdkit serving the plugin on a UNIX socket; yields the NBD URI."""
    with tempfile.TemporaryDirectory(prefix="v2v-") as d:
        sock = os.path.join(d, "nbdkit.sock")
        argv = ["nbdkit", "-f", "--exit-with-parent", "-U", sock,
                "python", str(PLUGIN), f"url={srv.image_url(ticket_id)}",
                f"size={SIZE}", f"cafile={srv.ca_file}"]
        with open(log, "wb") as err:
            proc = subprocess.Popen(argv, stdout=err, stderr=err)
        try:
            wait_for_socket(proc, sock, log)
            yield f"nbd+unix:///?socket={sock}"
        finally:
            proc.terminate()
            proc.wait(10)


def wait_for_socket(proc, sock, log):
    deadline = time.monotonic() + NBDKIT_START_TIMEOUT
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nbdkit did not start: {Path(log).read_text()}")
        time.sleep(0.05)


def qemu_img_convert(source, uri):
    return ["qemu-img", "convert", "-n", "-f", "qcow2", str(source),
            "-O", "raw", uri]


def nbdcopy(source, uri):
    """nbdcopy reads NBD only: a read-only qemu-nbd it starts serves the
    qcow2, as virt-v2v's input side does."""
    return ["nbdcopy", "--flush", "--", "[", "qemu-nbd", "-r", "-f", "qcow2",
            str(source), "]", uri]


@pytest.mark.parametrize("copier", [qemu_img_convert, nbdcopy],
                         ids=["qemu-img", "nbdcopy"])
def test_upload_into_a_qcow2_volume(srv, volume, source, copier, tmp_path):
    path, ticket = volume
    log = tmp_path / "nbdkit.log"
    mark = len(srv.log_text())
    with upload_plugin(srv, ticket["uuid"], log) as uri:
        copied = run(copier(source, uri))
        # Read back through the same plugin: GET with Range.
        read_back = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                         str(source), uri])
    for r in (copied, read_back):
        assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{log.read_text()}"
    srv.delete_ticket(ticket["uuid"])

    qemu_img("check", path)
    r = run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(source),
             str(path)])
    assert r.returncode == 0, f"images differ: {r.stdout}{r.stderr}"
    assert allocated_data(path) <= sum(DATA.values()) + CLUSTER_SLACK
    check_requests(srv, ticket["transfer_id"], mark, srv.local_socket,
                   WRITES | {("GET", True)})


def test_trim_zero_and_fua_write(srv, volume, tmp_path):
    """What the NBD client asks beyond plain writes: a trim and a zero
    become PATCH zero (with ``flush`` for FUA), a FUA write a PUT with
    ``flush=y``; the volume reads as asked and gives the trimmed range
    back."""
    path, ticket = volume
    log = tmp_path / "nbdkit.log"
    mark = len(srv.log_text())
    commands = ["write -P 0x11 0 4M", "discard 0 1M", "write -z -f 1M 1M",
                "write -f -P 0x61 2M 64k", "flush"]
    with upload_plugin(srv, ticket["uuid"], log) as uri:
        r = run(["qemu-io", "-f", "raw", *(a for c in commands
                                           for a in ("-c", c)), uri])
    assert r.returncode == 0 and "error" not in r.stdout.lower(), (
        f"{r.stdout}{r.stderr}\n{log.read_text()}")
    srv.delete_ticket(ticket["uuid"])

    qemu_img("check", path)
    qemu_io(path, "qcow2", "read -P 0 0 2M", "read -P 0x61 2M 64k",
            "read -P 0x11 2112k 1984k", "read -P 0 4M 60M")
    assert allocated_data(path) <= 3 * MiB
    check_requests(srv, ticket["transfer_id"], mark, srv.local_socket)


def run(argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def allocated_data(path):
    extents = json.loads(qemu_img("map", "--output=json", path))
    return sum(e["length"] for e in extents if e["data"])


#: An access line of an images request: where it came from, the method,
#: the status, and whether it names an offset (a write or a zero does, a
#: flush does not).
ACCESS_LINE = re.compile(r"\] (?P<peer>\S+) (?P<method>[A-Z]+) /images/\S+ "
                         r"(?P<status>\d{3}) transfer=(?P<transfer>\S+)"
                         r"(?P<offset> offset=)?")


#: The requests of a write: PUT, PATCH zero (with an offset), PATCH flush.
WRITES = {("PUT", True), ("PATCH", True), ("PATCH", False)}


def check_requests(srv, transfer_id, mark, local, expected=WRITES):
    """Every request of the transfer succeeded; they were of the expected
    kinds (method, offset or not); only the first OPTIONS left the UNIX
    socket when there is one."""
    requests = [m for m in map(ACCESS_LINE.search,
                               srv.log_text()[mark:].splitlines())
                if m and m["transfer"] == transfer_id]
    failed = [m.string for m in requests if int(m["status"]) >= 400]
    assert not failed, "\n".join(failed)
    kinds = {(m["peer"] == "local", m["method"], bool(m["offset"]))
             for m in requests}
    assert kinds == {(False, "OPTIONS", False)} | {
        (bool(local), method, offset) for method, offset in expected}

