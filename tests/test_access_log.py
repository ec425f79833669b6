"""The daemon's log, read back: one line per request with its status,
bytes, seconds and rate; ticket ids never whole; an error once, with its
cause.

A daemon of its own (its log holds only these tests' requests), real
requests on its sockets, and the log file it wrote.
"""

from __future__ import annotations

import re
import socket
import time
import uuid

import pytest

import servers
from diskferry.daemon.handlers.app import TICKET_PATHS
from diskferry.daemon.http import accesslog
from diskferry.daemon.http.request import AccessRecord

SIZE = 1 << 20


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("access-log")
    with servers.start_server("diskferry", workdir, tls=False,
                              local_socket="path") as srv:
        yield srv


@pytest.fixture
def ticket(daemon, tmp_path):
    image = servers.make_sparse_file(tmp_path / "disk.raw", SIZE,
                                     {0: b"logged data\n"})
    t = servers.ticket_dict(image, SIZE, ("read", "write"),
                            uuid=f"{uuid.uuid4()}")
    daemon.add_ticket(t)
    yield t
    daemon.delete_ticket(t["uuid"])


def new_lines(daemon, mark, count, pattern=""):
    """The log lines after ``mark`` matching ``pattern``, once there are
    ``count`` of them (the access line follows the response)."""
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in daemon.log_text()[mark:].splitlines()
                 if re.search(pattern, line)]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def request(daemon, method, path, headers=None, body=None):
    con = daemon.local_connection(timeout=10)
    try:
        con.request(method, path, body=body, headers=headers or {})
        res = con.getresponse()
        return res.status, res.read()
    finally:
        con.close()


def test_download_line_has_status_bytes_seconds_rate(daemon, ticket):
    mark = len(daemon.log_text())
    status, data = request(daemon, "GET", f"/images/{ticket['uuid']}")
    assert (status, len(data)) == (200, SIZE)
    shown = accesslog.secret_prefix(ticket["uuid"])
    [line] = new_lines(daemon, mark, 1, re.escape(f" GET /images/{shown} "))
    assert re.search(
        rf"\[local/\d+\] local GET /images/{re.escape(shown)} 200 "
        rf"transfer=\(ticket/{re.escape(shown)}\) offset=0 bytes={SIZE} "
        rf"\d+\.\d{{3}}s \d+\.\dMiB/s$", line), line
    assert ticket["uuid"][:5] not in daemon.log_text()


def test_refused_request_logged_once_with_status_and_cause(daemon):
    secret = str(uuid.uuid4())
    mark = len(daemon.log_text())
    status, _ = request(daemon, "OPTIONS", f"/images/{secret}")
    assert status == 403
    shown = accesslog.secret_prefix(secret)
    new_lines(daemon, mark, 1, re.escape(f"OPTIONS /images/{shown} "))
    # Written by the request's thread: anything else about it is there too.
    lines = new_lines(daemon, mark, 1, re.escape(shown))
    assert len(lines) == 1, lines
    assert f"OPTIONS /images/{shown} 403 0.000s: " in lines[0] or \
        re.search(rf"OPTIONS /images/{re.escape(shown)} 403 \d+\.\d{{3}}s: ",
                  lines[0]), lines[0]
    assert f"No such ticket '{shown}'" in lines[0]
    assert secret not in daemon.log_text()
    assert secret[:5] not in daemon.log_text()


def test_control_requests_shorten_ticket_ids(daemon, tmp_path):
    image = servers.make_sparse_file(tmp_path / "c.raw", 4096)
    t = servers.ticket_dict(image, 4096)
    mark = len(daemon.log_text())
    daemon.add_ticket(t)
    daemon.extend_ticket(t["uuid"], 600)
    daemon.get_ticket(t["uuid"])
    daemon.delete_ticket(t["uuid"])
    assert daemon.control("GET", f"/tickets/{t['uuid']}")[0] == 404
    shown = accesslog.secret_prefix(t["uuid"])
    lines = new_lines(daemon, mark, 5, re.escape(f"/tickets/{shown} "))
    # Each line is written after its answer: in any order.
    assert sorted(re.sub(r" (bytes=\d+ )?\d+\.\d{3}s.*", "",
                         line.split("] local ", 1)[1]) for line in lines) == sorted([
        f"PUT /tickets/{shown} 200", f"PATCH /tickets/{shown} 200",
        f"GET /tickets/{shown} 200", f"DELETE /tickets/{shown} 204",
        f"GET /tickets/{shown} 404"])
    assert t["uuid"][:5] not in daemon.log_text()


def test_ticket_body_naming_another_id_is_not_logged_whole(daemon, tmp_path):
    image = servers.make_sparse_file(tmp_path / "m.raw", 4096)
    t = servers.ticket_dict(image, 4096)
    in_path = str(uuid.uuid4())
    mark = len(daemon.log_text())
    status, _, body = daemon.control("PUT", f"/tickets/{in_path}", t)
    assert status == 400, body
    shown = accesslog.secret_prefix(in_path)
    lines = new_lines(daemon, mark, 1, re.escape(f"/tickets/{shown} "))
    assert " 400 " in lines[0]
    assert t["uuid"][:5] not in daemon.log_text()
    assert in_path[:5] not in daemon.log_text()


def test_unparsable_head_has_a_line(daemon):
    mark = len(daemon.log_text())
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(daemon.local_socket)
        s.sendall(b"GET /images/0123456789abcdef HTTP/9.9\r\n\r\n")
        status = s.recv(100).split(b" ")[1].decode()
    assert status.startswith(("4", "5")), status
    [line] = new_lines(daemon, mark, 1, r"\[local/\d+\] local - - ")
    assert re.search(rf" - - {status} \d+\.\d{{3}}s: .*HTTP", line), line
    assert "0123456789abcdef" not in daemon.log_text()


def test_client_gone_mid_download_is_one_line(daemon, ticket):
    """A client that leaves in the middle of a response: one line, with
    the status that was sent and the cause."""
    big = servers.make_sparse_file(
        daemon.workdir + "/big.raw", 256 << 20, {0: b"x"})
    t = servers.ticket_dict(big, 256 << 20, ("read",))
    daemon.add_ticket(t)
    try:
        mark = len(daemon.log_text())
        with socket.socket(socket.AF_UNIX) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(daemon.local_socket)
            s.sendall(f"GET /images/{t['uuid']} HTTP/1.1\r\n"
                      f"Host: x\r\n\r\n".encode())
            assert s.recv(100).startswith(b"HTTP/1.1 200 ")
        shown = re.escape(accesslog.secret_prefix(t["uuid"]))
        new_lines(daemon, mark, 1, rf"GET /images/{shown} ")
        # Its line, and no other about it (its ticket's PUT is logged
        # after its answer, maybe after the mark).
        lines = new_lines(daemon, mark, 1, rf"(?<!PUT /tickets/){shown}")
        assert len(lines) == 1, lines
        assert " 200 transfer=(ticket/" in lines[0]
        assert " offset=0 size=268435456 " in lines[0]
        assert "MiB/s" not in lines[0]
        assert ": connection lost: " in lines[0]
        assert t["uuid"][:5] not in daemon.log_text()
    finally:
        daemon.delete_ticket(t["uuid"])


@pytest.mark.parametrize("secret,shown", [
    ("6f1c0a1e-2b3c-4d5e-8f90-a1b2c3d4e5f6", "6f1c..."),
    ("demo", "d..."),
    ("abc", "..."),
])
def test_secret_prefix_is_never_the_secret(secret, shown):
    assert accesslog.secret_prefix(secret) == shown
    assert TICKET_PATHS.redact_path(f"/images/{secret}/extents") == \
        f"/images/{shown}/extents"
    assert TICKET_PATHS.redact_path("/images/*") == "/images/*"
    assert TICKET_PATHS.redact_path("/tickets/") == "/tickets/"
    assert TICKET_PATHS.redact(f"No such ticket {secret!r}", secret) == \
        f"No such ticket {shown!r}"


def test_a_server_error_is_logged_once_with_its_cause(daemon, tmp_path):
    """The client hears "cannot open the image"; the log says why, on the
    request's own line, and nowhere else."""
    missing = servers.make_sparse_file(tmp_path / "gone.raw", SIZE, {})
    t = servers.ticket_dict(missing, SIZE, ("read",), uuid=f"{uuid.uuid4()}")
    daemon.add_ticket(t)
    missing.unlink()
    mark = len(daemon.log_text())
    status, body = request(daemon, "GET", f"/images/{t['uuid']}")
    daemon.delete_ticket(t["uuid"])
    assert status == 500
    assert b"gone.raw" not in body
    lines = new_lines(daemon, mark, 1, "gone.raw")
    assert len(lines) == 1, daemon.log_text()[mark:]
    assert " 500 " in lines[0] and "No such file" in lines[0], lines


SECRET = "6f1c0a1e-2b3c-4d5e-8f90-a1b2c3d4e5f6"


@pytest.mark.parametrize("kwargs,expected", [
    (dict(method="GET", path=f"/images/{SECRET}", status=206,
          record=AccessRecord(f"(ticket/{SECRET[:18]})", 0, 1048576),
          elapsed=0.004),
     "[remote/3] 127.0.0.1:40112 GET /images/6f1c... 206 "
     "transfer=(ticket/6f1c...) offset=0 bytes=1048576 0.004s 250.0MiB/s"),
    (dict(method="OPTIONS", path="/images/demo", status=403,
          record=AccessRecord(), elapsed=0.0,
          cause="No such ticket 'demo'"),
     "[remote/3] 127.0.0.1:40112 OPTIONS /images/d... 403 0.000s: "
     "No such ticket 'd...'"),
    (dict(method="GET", path=f"/images/{SECRET}/extents", status=None,
          record=AccessRecord("t1", 4096, 65536), elapsed=1.5,
          cause=f"connection lost: {SECRET} gone"),
     "[remote/3] 127.0.0.1:40112 GET /images/6f1c.../extents - "
     "transfer=t1 offset=4096 size=65536 1.500s: connection lost: "
     "6f1c... gone"),
    (dict(method="-", path="-", status=400, record=AccessRecord(),
          elapsed=0.0,
          cause=f"Malformed request line: 'GET /tickets/{SECRET} HTTP/9'"),
     "[remote/3] 127.0.0.1:40112 - - 400 0.000s: Malformed request "
     "line: 'GET /tickets/6f1c... HTTP/9'"),
    (dict(method="GET", path="/info/", status=200, record=AccessRecord(),
          elapsed=0.0),
     "[remote/3] 127.0.0.1:40112 GET /info/ 200 bytes=0 0.000s"),
])
def test_line_format(kwargs, expected):
    assert accesslog.line(conn_id="remote/3", client="127.0.0.1:40112",
                          secrets=TICKET_PATHS, **kwargs) == expected


def test_an_application_naming_no_secret_has_nothing_shortened():
    line = accesslog.line(conn_id="c/1", client="local", method="GET",
                          path=f"/images/{SECRET}", status=200,
                          record=AccessRecord(), elapsed=0.0,
                          cause=f"No such ticket {SECRET!r}")
    assert line == (f"[c/1] local GET /images/{SECRET} 200 0.000s: "
                    f"No such ticket {SECRET!r}")
