"""An NBD export that dies in the middle of a request: one access line
naming the export and what failed, no traceback, and for a PUT a 500
the client reads (its body drained) saying the storage went away.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import time

import pytest

import nbd_servers
import servers

MiB = 1 << 20
SIZE = 64 * MiB


@contextlib.contextmanager
def exported(srv, tmp_path, ops):
    """A ticket on a qemu-nbd export of a random image, and the export."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(SIZE))
    export = nbd_servers.start_export("qemu-nbd", disk,
                                      sock=str(tmp_path / "export.sock"),
                                      read_only="write" not in ops)
    t = servers.ticket_dict("/unused", SIZE, ops, url=export.url)
    srv.add_ticket(t)
    try:
        yield t, export
    finally:
        export.stop()
        srv.delete_ticket(t["uuid"])


def log_after(srv, mark, pattern):
    """The log after ``mark``, once a line matching ``pattern`` is in it
    (the access line follows the response)."""
    deadline = time.monotonic() + 10
    while True:
        text = srv.log_text()[mark:]
        if pattern in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


@pytest.mark.parametrize("transport", ["unix", "tls"])
def test_export_dying_mid_put_is_named(daemons, tmp_path, transport):
    srv = daemons.get("diskferry", local_socket="path")
    mark = len(srv.log_text())
    with exported(srv, tmp_path, ("read", "write")) as (t, export):
        con = (srv.local_connection(timeout=30) if transport == "unix"
               else srv.remote_connection(timeout=30))
        con.putrequest("PUT", f"/images/{t['uuid']}")
        con.putheader("Content-Length", str(SIZE))
        con.endheaders()
        con.send(os.urandom(8 * MiB))
        export.kill()
        for _ in range(56):
            con.send(os.urandom(MiB))
        res = con.getresponse()
        body = res.read()
        con.close()
    assert res.status == 500
    assert b"storage went away" in body
    assert export.sock.encode() not in body
    log = log_after(srv, mark, "PUT /images/")
    assert "Traceback" not in log
    assert f"NBD export {export.url}" in log


def test_export_dying_mid_get_is_named(daemons, tmp_path):
    srv = daemons.get("diskferry", local_socket="path")
    mark = len(srv.log_text())
    with exported(srv, tmp_path, ("read",)) as (t, export):
        with contextlib.closing(srv.local_connection(timeout=30)) as con:
            con.request("GET", f"/images/{t['uuid']}")
            res = con.getresponse()
            assert res.status == 200
            got = len(res.read(MiB))
            export.kill()
            # The answer started: the body is cut short.
            with contextlib.suppress(http.client.IncompleteRead):
                while chunk := res.read(MiB):
                    got += len(chunk)
    assert got < SIZE
    log = log_after(srv, mark, "GET /images/")
    assert "Traceback" not in log
    assert f"NBD export {export.url}" in log
