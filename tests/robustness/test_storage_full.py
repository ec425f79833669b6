"""A full disk is an answer the client can read, on every transport.

A PUT whose write fails drains the rest of its body (up to a bound), then
answers: 507 for ENOSPC, with the error's text, so that a client still
sending reads the status instead of a broken pipe; the connection stays
usable and the daemon keeps serving. Storage: a small tmpfs (the file
backend) and nbdkit's error filter answering writes with ENOSPC (the NBD
backend).
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
import uuid

import pytest

import nbd_servers
import servers

MiB = 1 << 20
SIZE = 64 * MiB


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs, mounted for the test (root only)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                          str(mnt)], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def connection(daemons, transport):
    """A daemon and a connection to it over ``transport``."""
    srv = daemons.get("diskferry", tls=transport != "tcp",
                      local_socket="path")
    if transport == "unix":
        return srv, srv.local_connection(timeout=30)
    return srv, srv.remote_connection()


def put(con, ticket_id, body, offset=0):
    con.request("PUT", f"/images/{ticket_id}", body=body, headers={
        "Content-Range": f"bytes {offset}-{offset + len(body) - 1}/*"})
    res = con.getresponse()
    return res.status, res.read()


@pytest.mark.parametrize("transport", ["unix", "tcp", "tls"])
def test_full_file_system_answers_507(daemons, small_fs, transport):
    srv, con = connection(daemons, transport)
    image = small_fs / "disk.raw"
    image.write_bytes(b"")
    os.truncate(image, SIZE)
    t = servers.ticket_dict(image, SIZE, ("read", "write"),
                            uuid=str(uuid.uuid4()))
    srv.add_ticket(t)
    acknowledged = os.urandom(MiB)
    try:
        status, _ = put(con, t["uuid"], acknowledged)
        assert status == 200
        status, body = put(con, t["uuid"], os.urandom(16 * MiB), MiB)
        assert status == 507, body
        assert b"No space left on device" in body
        # The same connection goes on: the body was drained.
        con.request("GET", f"/images/{t['uuid']}",
                    headers={"Range": "bytes=0-0"})
        res = con.getresponse()
        res.read()
        assert res.status == 206
    finally:
        con.close()
        srv.delete_ticket(t["uuid"])
    # What was acknowledged before the disk filled is intact.
    with open(image, "rb") as f:
        assert f.read(MiB) == acknowledged


@pytest.mark.parametrize("transport", ["unix", "tcp", "tls"])
def test_nbd_export_without_room_answers_507(daemons, tmp_path, transport):
    srv, con = connection(daemons, transport)
    sock = str(tmp_path / "full.sock")
    argv = nbd_servers.nbdkit_argv(
        None, sock, filters=("error",), plugin="memory",
        params=(f"{SIZE}", "error-pwrite=ENOSPC", "error-pwrite-rate=100%",
                "error-zero=ENOSPC", "error-zero-rate=100%"))
    export = nbd_servers.start_process(argv, sock, sock + ".log")
    try:
        t = servers.ticket_dict("/unused", SIZE, ("read", "write"),
                                url=export.url, uuid=str(uuid.uuid4()))
        srv.add_ticket(t)
        try:
            status, body = put(con, t["uuid"], os.urandom(4 * MiB))
            assert status == 507, body
            assert b"ENOSPC" in body
            con.request("PATCH", f"/images/{t['uuid']}",
                        body=b'{"op": "zero", "offset": 0, "size": 65536}',
                        headers={"Content-Type": "application/json"})
            res = con.getresponse()
            assert res.status == 507, res.read()
            res.read()
        finally:
            con.close()
            srv.delete_ticket(t["uuid"])
    finally:
        export.stop()


def fill(directory):
    """Take every free byte of the file system under ``directory``."""
    block = b"\xff" * (64 * 1024)
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise


def framed(ticket_id, body, offset, framing):
    """A PUT's head and body as one byte string, sent in one go."""
    headers = [f"PUT /images/{ticket_id} HTTP/1.1", "Host: localhost",
               f"Content-Range: bytes {offset}-{offset + len(body) - 1}/*"]
    if framing == "chunked":
        headers.append("Transfer-Encoding: chunked")
        pieces = [body[i:i + MiB] for i in range(0, len(body), MiB)]
        data = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
        data += b"0\r\n\r\n"
    else:
        headers.append(f"Content-Length: {len(body)}")
        if framing == "continue":
            headers.append("Expect: 100-continue")
        data = body
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + data


def final_response(raw):
    """The first answer that is not 100 Continue."""
    while True:
        res = raw.response("PUT")
        if res.status != 100:
            return res


@pytest.mark.parametrize("framing", ["length", "chunked", "continue"])
@pytest.mark.parametrize("transport", ["unix", "tls"])
def test_full_disk_answered_at_once(daemons, small_fs, transport, framing):
    """Head and body in one send on a full file system: the 507 comes as
    soon as the body is drained, never after the idle timeout (the bytes
    that arrived with the head are part of the body drained)."""
    srv = daemons.get("diskferry", tls=True, local_socket="path")
    image = small_fs / "disk.raw"
    image.write_bytes(b"")
    os.truncate(image, SIZE)
    fill(small_fs)
    t = servers.ticket_dict(image, SIZE, ("read", "write"),
                            uuid=str(uuid.uuid4()))
    srv.add_ticket(t)
    sock = (srv.raw_local_socket(timeout=20) if transport == "unix"
            else srv.raw_remote_socket(timeout=20))
    try:
        with servers.RawConnection(sock) as raw:
            start = time.monotonic()
            # Longer than the buffer a body is received into.
            raw.send(framed(t["uuid"], os.urandom(16 * MiB), MiB, framing))
            res = final_response(raw)
            elapsed = time.monotonic() - start
            assert res.status == 507, res.body
            assert b"No space left on device" in res.body
            assert elapsed < 5, f"answered after {elapsed:.1f} s"
            # The body was drained: the connection goes on.
            res = raw.request("GET", f"/images/{t['uuid']}",
                              headers={"Range": "bytes=0-0"})
            assert res.status == 206
    finally:
        srv.delete_ticket(t["uuid"])
    # Nothing of the body landed outside its range.
    with open(image, "rb") as f:
        head = f.read(MiB)
        f.seek(17 * MiB)
        tail = f.read()
    assert head == bytes(MiB)
    assert tail == bytes(len(tail))
