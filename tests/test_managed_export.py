"""Format tickets: the daemon serves the guest data of an image in any
format qemu reads, through a qemu-nbd it runs for the ticket's life.

Real qemu-img, qemu-io and qemu-nbd; a ticket's export is checked gone
(no process, no socket) after each way a ticket or the daemon can end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import servers
from diskferry.daemon import exports
from nbd_servers import create_encrypted_qcow2, qemu_img, qemu_io
from servers import Endpoint, ticket_dict

MiB = 1 << 20
SIZE = 16 * MiB


# --- helpers -----------------------------------------------------------------


@pytest.fixture(params=["tls", "path"])
def endpoint(request, daemons) -> Endpoint:
    """The daemon over TLS and over its UNIX socket."""
    return Endpoint(daemons.get("diskferry", local_socket="path"),
                    request.param)


@pytest.fixture(autouse=True)
def no_exports_left(daemons):
    """The shared daemon's format tickets end with the test that added
    them, and their exports with them."""
    yield
    srv = daemons.get("diskferry", local_socket="path")
    status, _, body = srv.control("GET", "/tickets/")
    for info in json.loads(body) if status == 200 else []:
        if "export" in info:
            srv.delete_ticket(info["uuid"])


def add(srv, path, fmt, ops=("read",), **extra) -> dict:
    t = ticket_dict(path, extra.pop("size", SIZE), ops, format=fmt, **extra)
    srv.add_ticket(t)
    return t


def request(endpoint, method, path, body=None, headers=None):
    with contextlib.closing(endpoint.connect()) as con:
        con.request(method, path, body=body, headers=headers or {})
        res = con.getresponse()
        return res.status, res.read()


def get(endpoint, ticket, query="", start=None, end=None) -> bytes:
    headers = {} if start is None else {"Range": f"bytes={start}-{end}"}
    status, body = request(endpoint, "GET",
                           f"/images/{ticket['uuid']}{query}", None, headers)
    assert status in (200, 206), body
    return body


def extents(endpoint, ticket, context="zero"):
    body = get(endpoint, ticket, f"/extents?context={context}")
    return [(e["start"], e["length"], e.get("zero"), e.get("hole"),
             e.get("dirty")) for e in json.loads(body)]


def guest_bytes(path, fmt, backing_chain=True) -> bytes:
    """What qemu reads as the guest disk of ``path`` (while an export may
    hold it: -U), or of its top layer alone."""
    out = f"{path}.guest.raw"
    if backing_chain:
        source = ["-f", fmt, str(path)]
    else:
        source = ["json:" + json.dumps({
            "driver": fmt, "backing": None,
            "file": {"driver": "file", "filename": str(path)}})]
    try:
        qemu_img("convert", "-U", *source, "-O", "raw", out)
        with open(out, "rb") as f:
            return f.read()
    finally:
        os.unlink(out)


def export_of(srv, ticket) -> dict:
    return srv.get_ticket(ticket["uuid"])["export"]


def wait_gone(pid, socket_path, timeout=10.0):
    """The export's process is gone (not even a zombie) and so is its
    socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid) and not os.path.exists(socket_path):
            return
        time.sleep(0.05)
    raise AssertionError(f"qemu-nbd {pid} running: {_running(pid)}, socket "
                         f"{socket_path} exists: {os.path.exists(socket_path)}")


def _running(pid) -> bool:
    """Whether ``pid`` runs: a zombie does not, unless threads of its own
    still do (a killed process's first thread ends before the others)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    return state != "Z" or threads != [str(pid)]


def socket_path(export) -> str:
    return export["url"].removeprefix("nbd:unix:")


@pytest.fixture
def chain(tmp_path):
    """A qcow2 with a two-level backing chain: data in each layer, some
    hidden by an upper layer, a zeroed cluster, the rest unallocated."""
    base = tmp_path / "base.qcow2"
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, SIZE)
    qemu_io(base, "qcow2", "write -P 0xaa 0 2M", "write -P 0xab 8M 1M")
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", mid)
    qemu_io(mid, "qcow2", "write -P 0xbb 1M 2M")
    qemu_img("create", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", top)
    qemu_io(top, "qcow2", "write -P 0xcc 2M 2M", "write -z 8M 64k")
    return top


# --- data --------------------------------------------------------------------


@dataclasses.dataclass
class Image:
    """An image a format ticket serves, and what it should serve."""

    path: pathlib.Path
    format: str
    #: Further ticket fields.
    fields: dict
    #: The zero context's extents: (start, length, zero, hole, dirty).
    extents: list

    def guest(self) -> bytes:
        return guest_bytes(self.path, self.format,
                           self.fields.get("backing_chain", True))

    def add(self, srv, ops=("read",)) -> dict:
        return add(srv, self.path, self.format, ops, **self.fields)


def _one_layer(tmp_path, fmt) -> Image:
    path = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-f", fmt, path, SIZE)
    qemu_io(path, fmt, "write -P 0x42 1M 1M")
    # qemu's vdi driver says a block it has not allocated is present and
    # zero (``qemu-img map``: depth 0, present): not a hole.
    hole = fmt != "vdi"
    return Image(path, fmt, {}, [
        (0, MiB, True, hole, None),
        (MiB, MiB, False, False, None),
        (2 * MiB, SIZE - 2 * MiB, True, hole, None),
    ])


IMAGES = ["chain", "top-layer", "vmdk", "vdi"]


@pytest.fixture(params=IMAGES)
def image(request, tmp_path) -> Image:
    """A qcow2 with a two-level backing chain, served whole or its top
    layer alone (``backing_chain: false``: what the top layer does not
    allocate is a hole, and reads as zeros), a vmdk and a vdi; and, for
    tests that ask, a new empty qcow2."""
    if request.param == "new-qcow2":
        path = tmp_path / "new.qcow2"
        qemu_img("create", "-f", "qcow2", path, SIZE)
        return Image(path, "qcow2", {}, [(0, SIZE, True, True, None)])
    if request.param in ("vmdk", "vdi"):
        return _one_layer(tmp_path, request.param)
    top = request.getfixturevalue("chain")
    if request.param == "chain":
        return Image(top, "qcow2", {}, [
            (0, 4 * MiB, False, False, None),
            (4 * MiB, 4 * MiB, True, True, None),
            (8 * MiB, 64 * 1024, True, False, None),    # zeroed in top
            (8 * MiB + 64 * 1024, MiB - 64 * 1024, False, False, None),
            (9 * MiB, 7 * MiB, True, True, None),
        ])
    return Image(top, "qcow2", {"backing_chain": False}, [
        (0, 2 * MiB, True, True, None),
        (2 * MiB, 2 * MiB, False, False, None),
        (4 * MiB, 4 * MiB, True, True, None),
        (8 * MiB, 64 * 1024, True, False, None),
        (8 * MiB + 64 * 1024, SIZE - 8 * MiB - 64 * 1024, True, True, None),
    ])


def test_get_serves_guest_data(endpoint, image):
    t = image.add(endpoint.server)
    expected = image.guest()
    assert get(endpoint, t) == expected
    assert get(endpoint, t, start=MiB, end=3 * MiB - 1) == \
        expected[MiB:3 * MiB]


def test_top_layer_alone_reads_holes_as_zeros(chain):
    data = guest_bytes(chain, "qcow2", backing_chain=False)
    assert data[:2 * MiB] == bytes(2 * MiB)
    assert data[2 * MiB:4 * MiB] == b"\xcc" * (2 * MiB)
    assert data[4 * MiB:] == bytes(SIZE - 4 * MiB)


def test_zero_extents(endpoint, image):
    t = image.add(endpoint.server)
    assert extents(endpoint, t) == image.extents


@pytest.mark.parametrize("image", [*IMAGES, "new-qcow2"], indirect=True)
def test_put_zero_flush_write_the_guest_disk(endpoint, image):
    expected = bytearray(image.guest())
    t = image.add(endpoint.server, ops=("read", "write"))
    path = f"/images/{t['uuid']}"
    status, body = request(endpoint, "PUT", path, b"\x5a" * (3 * MiB),
                           {"Content-Range": f"bytes {MiB}-{4 * MiB - 1}/*"})
    assert status == 200, body
    expected[MiB:4 * MiB] = b"\x5a" * (3 * MiB)
    zero = json.dumps({"op": "zero", "offset": 2 * MiB, "size": MiB,
                       "flush": False}).encode()
    status, body = request(endpoint, "PATCH", path, zero,
                           {"Content-Type": "application/json"})
    assert status == 200, body
    expected[2 * MiB:3 * MiB] = bytes(MiB)
    status, body = request(endpoint, "PATCH", path,
                           json.dumps({"op": "flush"}).encode(),
                           {"Content-Type": "application/json"})
    assert status == 200, body
    assert get(endpoint, t) == expected
    endpoint.server.delete_ticket(t["uuid"])
    qemu_img("check", "-f", image.format, image.path)
    assert image.guest() == expected


def test_checksum_is_of_the_guest_data(endpoint, image, tmp_path):
    raw = tmp_path / "guest.raw"
    raw.write_bytes(image.guest())
    q = image.add(endpoint.server)
    r = ticket_dict(raw, SIZE, ("read",))
    endpoint.server.add_ticket(r)
    assert get(endpoint, q, "/checksum") == get(endpoint, r, "/checksum")


@pytest.mark.parametrize("image", ["new-qcow2", "chain", "top-layer"],
                         indirect=True)
def test_dirty_extents_from_a_bitmap(endpoint, image):
    """Dirty where qemu wrote since ``qemu-img bitmap --add``, and the
    dirty context's zero flags are the zero context's."""
    qemu_io(image.path, "qcow2", "write -P 1 0 1M")
    qemu_img("bitmap", "--add", image.path, "b1")
    qemu_io(image.path, "qcow2", "write -P 2 4M 64k", "write -z 8M 1M")
    t = add(endpoint.server, image.path, "qcow2", dirty=True, bitmap="b1",
            **image.fields)
    found = extents(endpoint, t, "dirty")
    dirty: list[tuple[int, int, bool]] = []
    for start, length, _, _, flag in found:
        if dirty and dirty[-1][2] == flag:  # apart only by zero
            dirty[-1] = (dirty[-1][0], dirty[-1][1] + length, flag)
        else:
            dirty.append((start, length, flag))
    assert dirty == [
        (0, 4 * MiB, False),
        (4 * MiB, 64 * 1024, True),
        (4 * MiB + 64 * 1024, 4 * MiB - 64 * 1024, False),
        (8 * MiB, MiB, True),
        (9 * MiB, 7 * MiB, False),
    ]
    zero = extents(endpoint, t, "zero")
    for start, length, flag, _, _ in found:
        assert {z for s, n, z, _, _ in zero
                if s < start + length and start < s + n} == {flag}, start


def test_raw_serves_the_container(endpoint, chain):
    t = ticket_dict(chain, os.path.getsize(chain), ("read",))
    endpoint.server.add_ticket(t)
    assert get(endpoint, t) == chain.read_bytes()
    assert "export" not in endpoint.server.get_ticket(t["uuid"])


# --- refusals at ticket add --------------------------------------------------


def add_error(srv, path, fmt, **extra) -> str:
    t = ticket_dict(path, extra.pop("size", SIZE), ("read", "write"),
                    format=fmt, **extra)
    with pytest.raises(servers.TicketError) as e:
        srv.add_ticket(t)
    assert e.value.status == 400, e.value
    return str(e.value)


@pytest.fixture
def diskferry(daemons):
    return daemons.get("diskferry", local_socket="path")


def test_refuses_another_format(diskferry, chain):
    assert "vmdk" in add_error(diskferry, chain, "vmdk").lower()


def test_refuses_a_missing_backing_file(diskferry, chain, tmp_path):
    os.rename(tmp_path / "mid.qcow2", tmp_path / "gone.qcow2")
    assert "mid.qcow2" in add_error(diskferry, chain, "qcow2")


def test_refuses_more_than_the_virtual_size(diskferry, chain):
    message = add_error(diskferry, chain, "qcow2", size=SIZE + 512)
    assert "virtual size" in message


def test_refuses_a_missing_bitmap(diskferry, chain):
    message = add_error(diskferry, chain, "qcow2", dirty=True, bitmap="nope")
    assert "nope" in message


def test_refuses_an_encrypted_image(diskferry, tmp_path):
    image = tmp_path / "secret.qcow2"
    create_encrypted_qcow2(image, SIZE)
    assert "encrypted" in add_error(diskferry, image, "qcow2")


@contextlib.contextmanager
def held_by_qemu_nbd(path):
    sock = f"{path}.sock"
    holder = subprocess.Popen(
        ["qemu-nbd", f"--socket={sock}", "--persistent", "-f", "qcow2",
         path], stderr=subprocess.PIPE)
    try:
        # Its socket comes before the image is open; its greeting after.
        deadline = time.monotonic() + 10
        while not _greets(sock):
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.01)
        yield
    finally:
        holder.terminate()
        holder.wait()


@contextlib.contextmanager
def held_by_qemu_io(path):
    """An interactive qemu-io, the image open for writing until its input
    ends."""
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", path], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # Once it answers a read, the image is open (and locked).
        holder.stdin.write(b"read 0 512\n")
        holder.stdin.flush()
        line = holder.stdout.readline()
        assert b"read 512/512 bytes" in line, line
        yield
    finally:
        holder.stdin.close()
        holder.wait(10)


@pytest.mark.parametrize("ops", [("read",), ("read", "write")])
@pytest.mark.parametrize("hold", [held_by_qemu_nbd, held_by_qemu_io])
def test_refuses_an_image_another_qemu_holds(diskferry, chain, hold, ops):
    """qemu's image locking: refused with qemu's reason, for reading as
    for writing (never opened with ``--force-share``)."""
    with hold(chain):
        t = ticket_dict(chain, SIZE, ops, format="qcow2")
        with pytest.raises(servers.TicketError) as e:
            diskferry.add_ticket(t)
        assert e.value.status == 400, e.value
        assert "lock" in str(e.value)
    # Free again, the image is served.
    t = add(diskferry, chain, "qcow2", ops=ops)
    assert get(Endpoint(diskferry, "path"), t) == guest_bytes(chain, "qcow2")


def _greets(path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        try:
            s.connect(path)
            return s.recv(8) == b"NBDMAGIC"
        except OSError:
            return False


@pytest.mark.parametrize("fields, word", [
    ({"format": "Qcow2!"}, "format name"),
    ({"format": "raw", "backing_chain": False}, "backing chain"),
    ({"format": "qcow2", "bitmap": "b1"}, "dirty"),
])
def test_refuses_bad_fields(diskferry, chain, fields, word):
    t = ticket_dict(chain, SIZE, ("read",), **fields)
    with pytest.raises(servers.TicketError) as e:
        diskferry.add_ticket(t)
    assert e.value.status == 400
    assert word in str(e.value)


def test_refuses_a_format_for_an_nbd_url(diskferry):
    t = ticket_dict("/x", SIZE, ("read",), format="qcow2",
                    url="nbd:unix:/run/x.sock")
    with pytest.raises(servers.TicketError) as e:
        diskferry.add_ticket(t)
    assert e.value.status == 400 and "file: url" in str(e.value)


# --- the export's life -------------------------------------------------------


def test_export_shown_and_private(diskferry, chain):
    t = add(diskferry, chain, "qcow2", ops=("read",))
    info = diskferry.get_ticket(t["uuid"])
    assert info["format"] == "qcow2"
    export = info["export"]
    assert export["kind"] == "qemu-nbd" and export["running"]
    assert "--read-only" in export["command"]
    assert "--allocation-depth" in export["command"]
    assert os.stat(socket_path(export)).st_mode & 0o777 == 0o600
    assert t["uuid"] not in socket_path(export)


def test_delete_stops_the_export(diskferry, chain):
    t = add(diskferry, chain, "qcow2")
    export = export_of(diskferry, t)
    diskferry.delete_ticket(t["uuid"])
    wait_gone(export["pid"], socket_path(export), timeout=0.1)


def test_replacing_a_ticket_replaces_its_export(diskferry, chain):
    """The old export holds the image's write lock: it ends first."""
    t = add(diskferry, chain, "qcow2", ops=("read", "write"))
    old = export_of(diskferry, t)
    diskferry.add_ticket(t)
    wait_gone(old["pid"], socket_path(old), timeout=0.1)
    new = export_of(diskferry, t)
    assert new["running"] and new["pid"] != old["pid"]
    assert get(Endpoint(diskferry, "path"), t) == guest_bytes(chain, "qcow2")


def test_expiry_stops_the_export(diskferry, chain):
    t = add(diskferry, chain, "qcow2", timeout=1)
    export = export_of(diskferry, t)
    wait_gone(export["pid"], socket_path(export))
    assert not export_of(diskferry, t)["running"]
    # Extended and used again, it serves again.
    diskferry.extend_ticket(t["uuid"], 300)
    endpoint = Endpoint(diskferry, "path")
    assert get(endpoint, t) == guest_bytes(chain, "qcow2")


def test_expiry_waits_for_a_request_in_flight(diskferry, chain):
    """An expired ticket's export stops once its last request ends."""
    t = add(diskferry, chain, "qcow2", timeout=1)
    export = export_of(diskferry, t)
    con = Endpoint(diskferry, "path").connect()
    try:
        con.request("GET", f"/images/{t['uuid']}")
        res = con.getresponse()
        assert res.status == 200
        head = res.read(MiB)     # the rest waits in the daemon
        time.sleep(1 + 2 * exports.EXPIRY_INTERVAL)
        assert export_of(diskferry, t)["running"]
        assert head + res.read() == guest_bytes(chain, "qcow2")
    finally:
        con.close()
    wait_gone(export["pid"], socket_path(export))


def test_a_dead_export_is_named_then_restarted(diskferry, chain):
    t = add(diskferry, chain, "qcow2")
    endpoint = Endpoint(diskferry, "path")
    con = endpoint.connect()
    try:
        con.request("GET", f"/images/{t['uuid']}", headers={
            "Range": "bytes=0-4095"})
        res = con.getresponse()
        assert res.status == 206
        res.read()
        os.kill(export_of(diskferry, t)["pid"], 9)
        time.sleep(0.2)
        con.request("GET", f"/images/{t['uuid']}", headers={
            "Range": "bytes=0-4095"})
        res = con.getresponse()
        body = res.read()
        assert res.status == 500
        # How it died, and nothing it said before (it started well).
        assert b"(qemu-nbd was killed by SIGKILL)" in body, body
    finally:
        con.close()
    assert get(endpoint, t) == guest_bytes(chain, "qcow2")
    assert export_of(diskferry, t)["running"]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_daemon_end_stops_every_export(pki, chain, how):
    """Every export, also one started again on a request (the kernel's
    PR_SET_PDEATHSIG follows the thread that started it)."""
    # A short run directory: a socket path has at most 107 bytes.
    workdir = tempfile.mkdtemp(prefix="df-")
    srv = servers.start_server("diskferry", workdir, tls=False,
                               local_socket=None, pki=pki)
    try:
        tickets = [add(srv, chain, "qcow2", ops=("read",)) for _ in range(2)]
        exports = [export_of(srv, t) for t in tickets]
        # One export started again after it died: by a request's thread.
        os.kill(exports[1]["pid"], 9)
        status, body = request(Endpoint(srv, "tls"), "GET",
                               f"/images/{tickets[1]['uuid']}")
        assert status == 200 or (status == 500 and b"SIGKILL" in body), \
            (status, body)
        assert get(Endpoint(srv, "tls"), tickets[1]) == \
            guest_bytes(chain, "qcow2")
        exports.append(export_of(srv, tickets[1]))
        assert exports[2]["running"]
        assert exports[2]["pid"] != exports[1]["pid"]
    finally:
        if how == "SIGTERM":
            srv.stop()
        else:
            srv.kill()
    for export in exports:
        wait_gone(export["pid"], socket_path(export))
    shutil.rmtree(workdir)


# --- the command line --------------------------------------------------------


def ticket_cmd(srv, *args):
    return subprocess.run(
        [sys.executable, "-m", "diskferry", "ticket", "--socket",
         srv.control_socket, *args],
        capture_output=True, text=True, timeout=60)


def test_cli_add_detects_the_format(diskferry, chain):
    run = ticket_cmd(diskferry, "add", str(chain))
    assert run.returncode == 0, run.stderr
    ticket_id = run.stdout.strip()
    info = diskferry.get_ticket(ticket_id)
    assert info["format"] == "qcow2" and info["size"] == SIZE
    endpoint = Endpoint(diskferry, "path")
    assert get(endpoint, {"uuid": ticket_id}) == guest_bytes(chain, "qcow2")
    shown = ticket_cmd(diskferry, "show", ticket_id).stdout
    assert "format:" in shown and "qcow2" in shown
    export = info["export"]
    assert f"qemu-nbd {export['pid']} on {export['url']}" in shown


def test_cli_format_raw_serves_the_container(diskferry, chain):
    run = ticket_cmd(diskferry, "add", "--format", "raw", str(chain))
    assert run.returncode == 0, run.stderr
    ticket_id = run.stdout.strip()
    info = diskferry.get_ticket(ticket_id)
    assert "format" not in info and "export" not in info
    assert info["size"] == os.path.getsize(chain)
    endpoint = Endpoint(diskferry, "path")
    assert get(endpoint, {"uuid": ticket_id}) == chain.read_bytes()
    assert "export:" not in ticket_cmd(diskferry, "show", ticket_id).stdout


def test_cli_dirty_bitmap_and_top_layer(diskferry, chain):
    qemu_img("bitmap", "--add", chain, "b1")
    run = ticket_cmd(diskferry, "add", "--dirty", "--bitmap", "b1",
                     "--no-backing-chain", str(chain))
    assert run.returncode == 0, run.stderr
    info = diskferry.get_ticket(run.stdout.strip())
    assert (info["bitmap"], info["backing_chain"]) == ("b1", False)
    assert "--bitmap=b1" in info["export"]["command"]
    run = ticket_cmd(diskferry, "add", "--bitmap", "b1", str(chain))
    assert run.returncode == 1 and "--dirty" in run.stderr
