"""Hostile input: each finding of the hostile-input probe, reproduced.

Every test sent what used to get a 500, a broken connection or a forged
log line from diskferry, and checks the answer it gets now. These run on
diskferry only; where ovirt-imageio 2.5.1 answers the same, the case is
also in tests/conformance, and where it differs, docs/protocol.md lists
the difference:

    case                               ovirt-imageio 2.5.1    diskferry
    Content-Length of 5000 digits      400                    400
    Range / Content-Range, 4400 digits 500                    416 / 400
    unknown method (STORE, CONFIG)     405                    501
    DELETE /images/{id}                405, no Allow          405 + Allow
    JSON nested 10,000 deep            500                    400
    ticket inactivity_timeout 10**20   200, then 500          400
    ticket timeout 10**20              200                    400
"""

from __future__ import annotations

import json
import os
import re
import socket
import time

import pytest

import servers
from servers import RawConnection, make_sparse_file, ticket_dict

SIZE = 1 << 20
HUGE = "1" * 4400  # past CPython's 4,300-digit int() limit


@pytest.fixture(scope="module")
def diskferry(tmp_path_factory, pki):
    workdir = tmp_path_factory.mktemp("hostile")
    srv = servers.start_server("diskferry", workdir, local_socket="path", pki=pki)
    yield srv
    srv.stop()


@pytest.fixture
def ticket(diskferry, tmp_path):
    path = make_sparse_file(tmp_path / "image.raw", SIZE, {0: b"c" * 4096})
    t = ticket_dict(path, SIZE)
    diskferry.add_ticket(t)
    yield t
    diskferry.delete_ticket(t["uuid"])


def connect(srv, service):
    if service == "tls":
        return RawConnection(srv.raw_remote_socket(timeout=10))
    if service == "unix":
        return RawConnection(srv.raw_local_socket(timeout=10))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(srv.control_socket)
    return RawConnection(s)


def exchange(srv, service, data: bytes):
    with connect(srv, service) as con:
        con.send(data)
        return con.response()


def assert_no_traceback(srv):
    log = srv.log_text()
    assert "Traceback" not in log, log[-3000:]


# --- 1. numbers past 4,300 digits ----------------------------------------------


@pytest.mark.parametrize("service", ["tls", "unix", "control"])
def test_content_length_over_4300_digits_400(diskferry, service):
    path = "/tickets/x" if service == "control" else "/images/x"
    res = exchange(
        diskferry,
        service,
        f"PUT {path} HTTP/1.1\r\nHost: a\r\nContent-Length: {HUGE}\r\n\r\n".encode(),
    )
    assert res.status == 400
    assert b"Content-Length" in res.body
    assert res.header("Connection") == "close"
    assert_no_traceback(diskferry)


@pytest.mark.parametrize("service", ["tls", "unix"])
def test_range_over_4300_digits_416(diskferry, ticket, service):
    for value in (f"bytes={HUGE}-", f"bytes=0-{HUGE}"):
        with connect(diskferry, service) as con:
            res = con.request("GET", f"/images/{ticket['uuid']}", {"Range": value})
            assert res.status == 416
            assert b"Range" in res.body
            assert res.header("Content-Range") == f"bytes */{SIZE}"
            # Still in sync: the connection serves the next request.
            res = con.request(
                "GET", f"/images/{ticket['uuid']}", {"Range": "bytes=0-3"}
            )
            assert res.status == 206 and res.body == b"cccc"
    assert_no_traceback(diskferry)


@pytest.mark.parametrize("service", ["tls", "unix"])
def test_content_range_over_4300_digits_400(diskferry, ticket, service):
    for value in (f"bytes {HUGE}-1/*", f"bytes 0-{HUGE}/*"):
        with connect(diskferry, service) as con:
            res = con.request(
                "PUT", f"/images/{ticket['uuid']}", {"Content-Range": value}, b"x"
            )
        assert res.status == 400
        assert b"Content-Range" in res.body
    assert_no_traceback(diskferry)


@pytest.mark.parametrize(
    "query,name",
    [
        (f"extents?start={HUGE}", "start"),
        (f"extents?start=0&length={HUGE}", "length"),
        (f"checksum?block_size={HUGE}", "block_size"),
    ],
    ids=["start", "length", "block_size"],
)
def test_query_int_over_4300_digits_400(diskferry, ticket, query, name):
    with connect(diskferry, "unix") as con:
        res = con.request("GET", f"/images/{ticket['uuid']}/{query}")
    assert res.status == 400
    assert name.encode() in res.body
    assert len(res.body) < 200  # the value is not echoed whole
    assert_no_traceback(diskferry)


def test_ticket_number_over_4300_digits_400(diskferry, tmp_path):
    t = ticket_dict(tmp_path / "x.raw", SIZE)
    body = json.dumps(t).replace(f'"size": {SIZE}', f'"size": {HUGE}').encode()
    status, _, data = diskferry.control("PUT", f"/tickets/{t['uuid']}", body)
    assert status == 400, data
    assert_no_traceback(diskferry)


# --- 2. methods naming handler attributes -------------------------------------


@pytest.mark.parametrize(
    "method",
    ["STORE", "CONFIG", "SERVER", "FOO", "NO_SUCH_METHO", "get", "M-1",
     "BASELINE-CONTROL", "!#$%&'*+-.^_`|~", "A" * 40],
)
@pytest.mark.parametrize(
    "service,path",
    [("tls", "/images/{id}"), ("unix", "/images/{id}/extents"),
     ("tls", "/info/"), ("control", "/tickets/{id}")],
)
def test_unknown_method_501(diskferry, ticket, method, service, path):
    path = path.format(id=ticket["uuid"])
    head = f"{method} {path} HTTP/1.1\r\nHost: a\r\n\r\n"
    res = exchange(diskferry, service, head.encode())
    assert res.status == 501
    assert res.header("Content-Type").startswith("text/plain")
    assert_no_traceback(diskferry)


@pytest.mark.parametrize(
    "service,method,path,allow",
    [
        ("tls", "DELETE", "/images/{id}", "OPTIONS,GET,HEAD,PUT,PATCH"),
        ("unix", "POST", "/images/{id}", "OPTIONS,GET,HEAD,PUT,PATCH"),
        ("unix", "PUT", "/images/{id}/extents", "GET"),
        ("tls", "PUT", "/info/", "GET"),
        ("control", "POST", "/tickets/{id}", "GET,PUT,PATCH,DELETE"),
        ("control", "OPTIONS", "/tickets/{id}", "GET,PUT,PATCH,DELETE"),
    ],
)
def test_known_method_not_allowed_405_with_allow(
    diskferry, ticket, service, method, path, allow
):
    with connect(diskferry, service) as con:
        res = con.request(method, path.format(id=ticket["uuid"]))
        assert res.status == 405
        assert res.header("Allow") == allow
        # A 405 keeps the connection.
        assert con.request("GET", "/info/" if service != "control" else
                           f"/tickets/{ticket['uuid']}").status == 200


def test_router_reaches_only_http_methods():
    from diskferry.daemon.http.router import Router
    from diskferry.errors import MethodNotAllowed, MethodNotImplemented

    class Handler:
        store = object()  # not callable: was a TypeError, a 500

        def config(self, request):  # callable, but not an HTTP method
            raise AssertionError("reached")

        def get(self, request):
            return "got"

    class Req:
        def __init__(self, method):
            self.method, self.path = method, "/x"

    router = Router([("/x", Handler())])
    assert router.dispatch(Req("GET")) == "got"
    for method in ("STORE", "CONFIG"):
        with pytest.raises(MethodNotImplemented):
            router.dispatch(Req(method))
    with pytest.raises(MethodNotAllowed) as e:
        router.dispatch(Req("PUT"))
    assert e.value.headers() == {"Allow": "GET"}


# --- 3. deeply nested JSON ---------------------------------------------------


@pytest.mark.parametrize("depth", [33, 10_000])
@pytest.mark.parametrize("where", ["patch-image", "put-ticket", "patch-ticket"])
def test_deeply_nested_json_400(diskferry, ticket, where, depth):
    body = b"[" * depth + b"]" * depth
    if where == "patch-image":
        with connect(diskferry, "unix") as con:
            res = con.request(
                "PATCH", f"/images/{ticket['uuid']}",
                {"Content-Type": "application/json"}, body,
            )
            status, data = res.status, res.body
    else:
        method = "PUT" if where == "put-ticket" else "PATCH"
        status, _, data = diskferry.control(method, f"/tickets/{ticket['uuid']}", body)
    assert status == 400, data
    assert b"nested" in data
    assert_no_traceback(diskferry)


def test_nested_json_limit_unit():
    from diskferry.daemon.handlers.jsonbody import MAX_JSON_DEPTH, parse_json
    from diskferry.errors import BadRequest

    ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert parse_json(ok.encode()) is not None
    for depth in (MAX_JSON_DEPTH + 1, 100_000):
        deep = '{"a":' * depth + "1" + "}" * depth
        with pytest.raises(BadRequest):
            parse_json(deep.encode())


# --- 4. log injection --------------------------------------------------------


def test_control_characters_in_url_do_not_forge_log_lines(diskferry, ticket):
    forged = "abc%0AFORGED-LINE%0D%0AX-Injected:%20yes%1B[31m"
    with connect(diskferry, "tls") as con:
        assert con.request("GET", f"/images/{forged}").status == 403
    with connect(diskferry, "unix") as con:
        assert con.request("OPTIONS", f"/images/{ticket['uuid']}{forged}").status == 403
    with connect(diskferry, "control") as con:
        assert con.request("GET", f"/tickets/{forged}").status == 404
    # A ticket field logged with every request of the ticket.
    t = dict(ticket, transfer_id="t1\nFORGED-LINE transfer")
    diskferry.add_ticket(t)
    with connect(diskferry, "unix") as con:
        assert con.request("OPTIONS", f"/images/{t['uuid']}").status == 200
    deadline = time.monotonic() + 5
    while "FORGED-LINE transfer" not in diskferry.log_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lines = diskferry.log_text().splitlines()
    assert not [line for line in lines if line.startswith(("FORGED", "X-Injected"))]
    assert not [line for line in lines if "\x1b" in line or "\r" in line]
    # The forged path names no ticket: shortened as an id would be, its
    # line break escaped.
    assert any("/images/abc\\x0a..." in line for line in lines)
    assert any("t1\\x0aFORGED-LINE transfer" in line for line in lines)


def test_escaping_formatter_unit():
    import logging

    from diskferry.logformat import EscapingFormatter, escape

    assert escape("a\nb\r\x00\x1b\x7f\x85\u2028é") == (
        "a\\x0ab\\x0d\\x00\\x1b\\x7f\\x85\\u2028é"
    )
    fmt = EscapingFormatter("%(message)s")
    record = logging.LogRecord("n", logging.INFO, "f", 1, "id=%s", ("x\ny",), None)
    assert fmt.format(record) == "id=x\\x0ay"
    try:
        raise ValueError("bad\nline\x1b")
    except ValueError:
        import sys

        record = logging.LogRecord("n", logging.ERROR, "f", 1, "m", (), sys.exc_info())
    text = fmt.format(record)
    assert "\x1b" not in text and "Traceback" in text


# --- 5. ticket numbers out of range ------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("inactivity_timeout", 10**20),
        ("inactivity_timeout", 7 * 24 * 3600 + 1),
        ("timeout", 10**20),
        ("timeout", 365 * 24 * 3600 + 1),
        ("size", 2**63),
        ("size", 10**30),
    ],
)
def test_ticket_field_out_of_range_400(diskferry, tmp_path, field, value):
    t = ticket_dict(tmp_path / "x.raw", SIZE)
    t[field] = value
    status, _, data = diskferry.control("PUT", f"/tickets/{t['uuid']}", t)
    assert status == 400, data
    assert field.encode() in data
    assert diskferry.control("GET", f"/tickets/{t['uuid']}")[0] == 404


def test_patch_timeout_out_of_range_400(diskferry, ticket):
    path = f"/tickets/{ticket['uuid']}"
    status, _, data = diskferry.control("PATCH", path, {"timeout": 10**20})
    assert status == 400 and b"timeout" in data
    assert diskferry.control("PATCH", path, {"timeout": 365 * 24 * 3600})[0] == 200


def test_largest_inactivity_timeout_serves_many_requests(diskferry, tmp_path):
    """The finding: every connection broke after its first request."""
    path = make_sparse_file(tmp_path / "image.raw", SIZE)
    t = ticket_dict(path, SIZE, inactivity_timeout=7 * 24 * 3600,
                    timeout=365 * 24 * 3600)
    diskferry.add_ticket(t)
    for service in ("tls", "unix"):
        with connect(diskferry, service) as con:
            for _ in range(3):
                assert con.request("OPTIONS", f"/images/{t['uuid']}").status == 200
                assert con.request(
                    "GET", f"/images/{t['uuid']}", {"Range": "bytes=0-0"}
                ).status == 206
    diskferry.delete_ticket(t["uuid"])
    assert_no_traceback(diskferry)


# --- 6. head deadline and connection cap -------------------------------------

HEAD_TIMEOUT = 2
LIMIT = 12


@pytest.fixture(scope="module")
def limited(tmp_path_factory, pki):
    workdir = tmp_path_factory.mktemp("hostile-limited")
    srv = servers.start_server(
        "diskferry", workdir, local_socket="path", pki=pki,
        daemon_options={"head_timeout": HEAD_TIMEOUT, "connection_limit": LIMIT},
    )
    yield srv
    srv.stop()


def count_threads(pid):
    import os

    return len(os.listdir(f"/proc/{pid}/task"))


def wait_threads(pid, at_most, timeout=10.0):
    deadline = time.monotonic() + timeout
    while count_threads(pid) > at_most and time.monotonic() < deadline:
        time.sleep(0.05)
    return count_threads(pid)


def trickle(con, data, until):
    """Send a byte at a time until the server answers; return the time."""
    start = time.monotonic()
    for b in data:
        try:
            con.send(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.25)
        if time.monotonic() - start > until:
            break
    return start


@pytest.mark.parametrize("service", ["tls", "unix", "control"])
def test_slowloris_head_cut_at_deadline(limited, service):
    head = b"GET /images/* HTTP/1.1\r\nHost: localhost\r\n" + b"X: y\r\n" * 50
    with connect(limited, service) as con:
        con.send(b"G")  # a head started...
        start = time.monotonic()
        for b in head[1:]:  # ...and trickled, a byte every 0.2 s
            try:
                con.send(bytes([b]))
            except (BrokenPipeError, ConnectionResetError, OSError):
                break
            time.sleep(0.2)
            if time.monotonic() - start > HEAD_TIMEOUT + 3:
                break
        res = con.response()
        elapsed = time.monotonic() - start
        assert res.status == 408
        assert res.header("Connection") == "close"
        assert con.at_eof(timeout=2)
    assert HEAD_TIMEOUT - 0.5 < elapsed < HEAD_TIMEOUT + 2


def test_silent_new_connection_cut_at_deadline(limited):
    with connect(limited, "unix") as con:
        start = time.monotonic()
        res = con.response()
        assert res.status == 408
        assert time.monotonic() - start < HEAD_TIMEOUT + 2


def test_idle_keep_alive_not_cut_by_head_deadline(limited):
    """Between requests the idle timeout applies, not the head deadline."""
    with connect(limited, "tls") as con:
        assert con.request("OPTIONS", "/images/*").status == 200
        time.sleep(HEAD_TIMEOUT + 1)
        assert con.request("OPTIONS", "/images/*").status == 200
        # A head split across packets but complete in time is served.
        con.send(b"OPTIONS /images/* HTTP/1.1\r\n")
        time.sleep(HEAD_TIMEOUT / 2)
        con.send(b"Host: a\r\n\r\n")
        assert con.response().status == 200


def test_slowloris_crowd_cut_while_others_served(limited):
    baseline = count_threads(limited.pid)
    crowd = []
    try:
        for i in range(LIMIT - 2):
            con = connect(limited, "tls" if i % 2 else "unix")
            con.send(b"GET /images/* HTTP/1.1\r\n")
            crowd.append(con)
        start = time.monotonic()
        latencies = []
        while time.monotonic() - start < HEAD_TIMEOUT + 1:
            t0 = time.monotonic()
            with connect(limited, "unix") as con:
                assert con.request("OPTIONS", "/images/*").status == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)
        assert max(latencies) < 1.0
        for con in crowd:
            con.sock.settimeout(HEAD_TIMEOUT + 2)
            assert con.response().status == 408
    finally:
        for con in crowd:
            con.close()
    assert wait_threads(limited.pid, baseline + 2) <= baseline + 2


@pytest.mark.parametrize("service", ["tls", "unix"])
def test_connection_limit_503_retry_after(limited, service):
    held = []
    try:
        for i in range(LIMIT):
            # The connections of an earlier test may still be closing on
            # the daemon's side: room comes back within a moment.
            deadline = time.monotonic() + 5
            while True:
                con = connect(limited, "tls" if i % 2 else "unix")
                try:
                    status = con.request("OPTIONS", "/images/*").status
                except (ConnectionError, OSError):
                    status = None
                if status == 200:
                    break
                con.close()
                assert time.monotonic() < deadline, status
                time.sleep(0.05)
            held.append(con)
        with connect(limited, service) as con:
            res = con.response()  # answered without asking
            assert res.status == 503
            assert int(res.header("Retry-After")) > 0
            assert res.header("Content-Type").startswith("text/plain")
            assert res.header("Connection") == "close"
            assert con.at_eof(timeout=2)
        # The control service has its own room.
        assert limited.control("GET", "/tickets/none")[0] == 404
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:
            with connect(limited, service) as con:
                try:
                    if con.request("OPTIONS", "/images/*").status == 200:
                        break
                except (ConnectionError, OSError):
                    pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for con in held:
            con.close()


def test_log_tells_limit_reached(limited):
    log = limited.log_text()
    assert re.search(r"connections open, the limit", log)
    assert "Traceback" not in log


def test_fifo_ticket_answered_at_once(daemons, tmp_path):
    """Finding 10: a ticket whose file is a FIFO held a thread in open()
    without bound; now the request fails at once and the daemon serves."""
    srv = daemons.get("diskferry")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t = ticket_dict(fifo, 4096)
    srv.add_ticket(t)
    con = srv.remote_connection(timeout=5)
    try:
        con.request("OPTIONS", f"/images/{t['uuid']}")
        res = con.getresponse()
        body = res.read()
    finally:
        con.close()
    assert res.status == 500, body
    assert b"Cannot open" in body
    con = srv.remote_connection(timeout=5)
    try:
        con.request("OPTIONS", "/images/*")
        assert con.getresponse().status == 200
    finally:
        con.close()
