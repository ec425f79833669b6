"""Conformance: the tickets API on the control service.

Written from PROTOCOL.md and from what ovirt-imageio 2.5.1 answers.
Differences observed in ovirt-imageio 2.5.1 (its behaviour is the
contract where PROTOCOL.md is silent or differs):

- ``transferred`` appears in the ticket info only for tickets with a
  single op (``["read"]`` or ``["write"]``); a read-write ticket has no
  ``transferred`` key.  The tests check ``transferred`` on a read-only
  ticket only.
- An expired ticket is still listed by ``GET /tickets/{id}`` (200) while
  the images API answers 403 for it; ``PATCH`` with a new timeout revives
  it; ``PATCH {"timeout": 0}`` expires it at once.
- ``GET /tickets/`` (no id) is a 400 ("Ticket id is required");
  ``DELETE /tickets`` without the trailing slash is a 404.
- The control service does not serve ``/images`` nor ``/info/`` (404).
- ``DELETE`` of a ticket with an operation in progress waits
  ``[control] remove_timeout`` and answers 409 (text/plain); the ticket
  stays listed with ``canceled: true, active: true`` until the operation
  ends, and a later ``DELETE`` answers 204.  New requests get 403 at once.
  The operation in progress itself fails: a PUT whose body arrives after
  the cancel is answered 403 ("was canceled"), not 200.
- ``inactivity_timeout`` closes a connection idle that long (the server
  closes it, about on time); a connection with regular requests stays.
- ovirt-imageio accepts some values PROTOCOL.md would call invalid
  (``size: -1``, ``ops: ["bogus"]``, a ``uuid`` different from the URL
  id) with a 200; these cases are not tested either way.
"""

from __future__ import annotations

import json
import time

import pytest

from servers import TicketError, make_sparse_file, ticket_dict

SIZE = 1 << 20


@pytest.fixture
def image(tmp_path):
    return make_sparse_file(tmp_path / "image.raw", SIZE, {0: b"x" * 4096})


def control_json(server, method, path, body=None):
    status, headers, data = server.control(method, path, body)
    return status, headers, data


def assert_text_error(headers, data, status, expected_status):
    assert status == expected_status, data
    assert headers["Content-Type"].startswith("text/plain"), headers
    assert int(headers["Content-Length"]) == len(data)
    assert data.strip(), "error body must say what was wrong"


def test_add_and_get(server, image, make_ticket):
    t = make_ticket(server, image, SIZE, ops=["read", "write"], transfer_id="tx-1")
    status, headers, data = server.control("GET", f"/tickets/{t['uuid']}")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(data)
    info = json.loads(data)
    assert info["uuid"] == t["uuid"]
    assert info["size"] == SIZE
    assert info["url"] == t["url"]
    assert info["ops"] == ["read", "write"]
    assert info["timeout"] == 300
    assert info["transfer_id"] == "tx-1"
    assert info["active"] is False
    assert info["canceled"] is False
    assert info["connections"] == 0
    assert isinstance(info["expires"], int)
    assert isinstance(info["idle_time"], int | float)
    assert info["idle_time"] >= 0
    assert info["inactivity_timeout"] == 60
    assert info["sparse"] is False
    assert info["dirty"] is False


def test_put_answers_200_with_empty_body(server, image):
    t = ticket_dict(image, SIZE)
    status, headers, data = server.control("PUT", f"/tickets/{t['uuid']}", t)
    try:
        assert status == 200
        assert headers["Content-Length"] == "0"
        assert data == b""
    finally:
        server.control("DELETE", f"/tickets/{t['uuid']}")


def test_expires_follows_timeout(server, image, make_ticket):
    t = make_ticket(server, image, SIZE)
    before = server.get_ticket(t["uuid"])["expires"]
    server.extend_ticket(t["uuid"], 1300)
    after = server.get_ticket(t["uuid"])["expires"]
    # 300 s then 1300 s from (about) now: expires moved by about 1000 s.
    assert 995 <= after - before <= 1005


def test_add_replaces_existing(server, tmp_path, make_ticket):
    image = make_sparse_file(tmp_path / "image.raw", 2 * SIZE, {SIZE: b"y" * 10})
    t = make_ticket(server, image, SIZE, ops=["read"])
    t2 = dict(t, size=2 * SIZE, ops=["read", "write"], sparse=True)
    server.add_ticket(t2)
    info = server.get_ticket(t["uuid"])
    assert info["size"] == 2 * SIZE
    assert info["ops"] == ["read", "write"]
    assert info["sparse"] is True
    con = server.remote_connection()
    try:
        con.request(
            "GET", f"/images/{t['uuid']}", headers={"Range": f"bytes={SIZE}-{SIZE + 9}"}
        )
        res = con.getresponse()
        assert res.status == 206
        assert res.read() == b"y" * 10
    finally:
        con.close()


@pytest.mark.parametrize("field", ["uuid", "size", "url", "ops", "timeout"])
def test_missing_field_400(server, image, field):
    t = ticket_dict(image, SIZE)
    tid = t["uuid"]
    del t[field]
    status, headers, data = server.control("PUT", f"/tickets/{tid}", t)
    assert_text_error(headers, data, status, 400)
    assert field.encode() in data
    status, _, _ = server.control("GET", f"/tickets/{tid}")
    assert status == 404


@pytest.mark.parametrize(
    "field,value",
    [
        ("uuid", 5),
        ("size", "big"),
        ("url", 5),
        ("url", "ftp://host/image"),
        ("ops", "read"),
        ("timeout", "soon"),
        ("sparse", "yes"),
        ("dirty", 1),
        ("inactivity_timeout", "x"),
        ("transfer_id", 5),
        ("filename", 5),
    ],
)
def test_ill_typed_field_400(server, image, field, value):
    t = ticket_dict(image, SIZE)
    tid = t["uuid"]
    t[field] = value
    status, headers, data = server.control("PUT", f"/tickets/{tid}", t)
    assert_text_error(headers, data, status, 400)
    assert field.encode() in data
    status, _, _ = server.control("GET", f"/tickets/{tid}")
    assert status == 404


@pytest.mark.parametrize("body", [b"not json", b"{", b"[1, 2]", b'"ticket"'])
def test_invalid_json_400(server, body):
    status, headers, data = server.control("PUT", "/tickets/bad-json", body)
    assert_text_error(headers, data, status, 400)


def test_get_unknown_404(server):
    status, headers, data = server.control("GET", "/tickets/no-such-ticket")
    assert_text_error(headers, data, status, 404)


def test_get_without_id(server, image, make_ticket):
    """ovirt-imageio answers 400; diskferry lists its tickets (an
    extension, docs/protocol.md)."""
    t = make_ticket(server, image, SIZE)
    status, headers, data = server.control("GET", "/tickets/")
    if server.name == "ovirt-imageio":
        assert_text_error(headers, data, status, 400)
        return
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    listed = json.loads(data)
    assert [x["uuid"] for x in listed] == sorted(x["uuid"] for x in listed)
    mine = [x for x in listed if x["uuid"] == t["uuid"]]
    assert len(mine) == 1
    assert (mine[0]["size"], mine[0]["url"]) == (SIZE, t["url"])


def test_patch_unknown_404(server):
    status, headers, data = server.control(
        "PATCH", "/tickets/no-such-ticket", {"timeout": 10}
    )
    assert_text_error(headers, data, status, 404)


@pytest.mark.parametrize(
    "body", [b"not json", b"{}", b'{"timeout": "x"}'], ids=["json", "missing", "type"]
)
def test_patch_bad_body_400(server, image, make_ticket, body):
    t = make_ticket(server, image, SIZE)
    before = server.get_ticket(t["uuid"])
    status, headers, data = server.control("PATCH", f"/tickets/{t['uuid']}", body)
    assert_text_error(headers, data, status, 400)
    assert server.get_ticket(t["uuid"])["timeout"] == before["timeout"]


def test_patch_answers_200_with_empty_body(server, image, make_ticket):
    t = make_ticket(server, image, SIZE)
    status, headers, data = server.control(
        "PATCH", f"/tickets/{t['uuid']}", {"timeout": 500}
    )
    assert status == 200
    assert headers["Content-Length"] == "0"
    assert data == b""


def options_status(server, tid):
    con = server.remote_connection()
    try:
        con.request("OPTIONS", f"/images/{tid}")
        res = con.getresponse()
        res.read()
        return res.status
    finally:
        con.close()


def test_expired_ticket_403_and_revived_by_patch(server, image, make_ticket):
    t = make_ticket(server, image, SIZE, timeout=1)
    assert options_status(server, t["uuid"]) == 200
    time.sleep(2.1)
    assert options_status(server, t["uuid"]) == 403
    # Still known to the control service.
    assert server.get_ticket(t["uuid"])["uuid"] == t["uuid"]
    server.extend_ticket(t["uuid"], 300)
    assert options_status(server, t["uuid"]) == 200


def test_patch_timeout_zero_expires_now(server, image, make_ticket):
    t = make_ticket(server, image, SIZE)
    assert options_status(server, t["uuid"]) == 200
    server.extend_ticket(t["uuid"], 0)
    assert options_status(server, t["uuid"]) == 403


def test_delete_is_idempotent(server, image, make_ticket):
    t = make_ticket(server, image, SIZE)
    path = f"/tickets/{t['uuid']}"
    status, headers, data = server.control("DELETE", path)
    assert status == 204
    assert headers["Content-Length"] == "0"
    assert data == b""
    status, _, _ = server.control("GET", path)
    assert status == 404
    status, headers, _ = server.control("DELETE", path)
    assert status == 204
    assert headers["Content-Length"] == "0"
    assert options_status(server, t["uuid"]) == 403


def test_delete_unknown_204(server):
    status, headers, data = server.control("DELETE", "/tickets/never-added")
    assert status == 204
    assert headers["Content-Length"] == "0"


def test_delete_all(server, image, make_ticket):
    ids = [make_ticket(server, image, SIZE)["uuid"] for _ in range(3)]
    status, headers, _ = server.control("DELETE", "/tickets/")
    assert status == 204
    assert headers["Content-Length"] == "0"
    for tid in ids:
        with pytest.raises(TicketError) as e:
            server.get_ticket(tid)
        assert e.value.status == 404


def test_delete_cancels_open_connection(server, image, make_ticket):
    t = make_ticket(server, image, SIZE)
    con = server.remote_connection()
    try:
        path = f"/images/{t['uuid']}"
        con.request("GET", path, headers={"Range": "bytes=0-9"})
        res = con.getresponse()
        assert res.status == 206
        res.read()
        # The GET is complete on the server side too before the delete.
        assert wait_for(lambda: not server.get_ticket(t["uuid"])["active"])
        server.delete_ticket(t["uuid"])
        con.request("GET", path, headers={"Range": "bytes=0-9"})
        res = con.getresponse()
        assert res.status == 403
        res.read()
    finally:
        con.close()


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_connections_counted(server, image, make_ticket):
    t = make_ticket(server, image, SIZE, ops=["read"])
    cons = [server.remote_connection() for _ in range(2)]
    if server.local_socket:
        cons.append(server.local_connection())
    try:
        for con in cons:
            con.request("OPTIONS", f"/images/{t['uuid']}")
            res = con.getresponse()
            assert res.status == 200
            res.read()
        info = server.get_ticket(t["uuid"])
        assert info["connections"] == len(cons)
        assert info["active"] is False
    finally:
        for con in cons:
            con.close()
    assert wait_for(lambda: server.get_ticket(t["uuid"])["connections"] == 0)


def test_transferred_counts_overlaps_once(server, image, make_ticket):
    t = make_ticket(server, image, SIZE, ops=["read"])
    con = server.remote_connection()
    try:
        for rng in ("bytes=0-99", "bytes=50-149", "bytes=1000-1099"):
            con.request("GET", f"/images/{t['uuid']}", headers={"Range": rng})
            res = con.getresponse()
            assert res.status == 206
            res.read()
    finally:
        con.close()
    assert wait_for(lambda: server.get_ticket(t["uuid"])["connections"] == 0)
    assert server.get_ticket(t["uuid"])["transferred"] == 250


def test_transferred_counts_writes(server, image, make_ticket):
    t = make_ticket(server, image, SIZE, ops=["write"])
    con = server.remote_connection()
    try:
        for first in (0, 4096):
            con.request(
                "PUT",
                f"/images/{t['uuid']}?flush=n",
                body=b"w" * 8192,
                headers={"Content-Range": f"bytes {first}-{first + 8191}/*"},
            )
            res = con.getresponse()
            assert res.status == 200
            res.read()
    finally:
        con.close()
    assert wait_for(lambda: server.get_ticket(t["uuid"])["connections"] == 0)
    assert server.get_ticket(t["uuid"])["transferred"] == 4096 + 8192


def test_idle_time_grows(server, image, make_ticket):
    t = make_ticket(server, image, SIZE)
    time.sleep(1.2)
    assert server.get_ticket(t["uuid"])["idle_time"] >= 1


def test_control_does_not_serve_images(server, image, make_ticket):
    t = make_ticket(server, image, SIZE)
    status, headers, data = server.control("GET", f"/images/{t['uuid']}")
    assert_text_error(headers, data, status, 404)


def test_content_length_over_4300_digits_400(server):
    status, headers, data = server.control(
        "PUT", "/tickets/x", headers={"Content-Length": "9" * 5000}
    )
    assert_text_error(headers, data, status, 400)
    assert b"Content-Length" in data


def test_unknown_method_on_ticket_405(server, image, make_ticket):
    t = make_ticket(server, image, SIZE)
    # No body: ovirt-imageio answers without reading one and closes, and an
    # unread body makes that close a reset the answer may be lost to.
    status, headers, data = server.control("POST", f"/tickets/{t['uuid']}")
    assert_text_error(headers, data, status, 405)


# --- cancel while in use -----------------------------------------------------

REMOVE_TIMEOUT = 1


def start_stalled_put(srv, tid, length=100_000, sent=1000):
    """A PUT whose body is only partly sent: an operation in progress."""
    import servers

    con = servers.RawConnection(srv.raw_remote_socket(timeout=15))
    con.send(
        (
            f"PUT /images/{tid} HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Length: {length}\r\n\r\n"
        ).encode()
        + b"a" * sent
    )
    assert wait_for(lambda: server_info(srv, tid)["active"]), "PUT not active"
    return con


def server_info(srv, tid):
    return srv.get_ticket(tid)


@pytest.fixture(params=["ovirt-imageio", "diskferry"])
def busy_server(request, daemons):
    return daemons.get(request.param, remove_timeout=REMOVE_TIMEOUT)


def test_delete_busy_ticket_409_then_204(busy_server, image, make_ticket):
    srv = busy_server
    t = make_ticket(srv, image, SIZE, inactivity_timeout=30)
    con = start_stalled_put(srv, t["uuid"])
    try:
        start = time.monotonic()
        status, headers, data = srv.control("DELETE", f"/tickets/{t['uuid']}")
        elapsed = time.monotonic() - start
        assert_text_error(headers, data, status, 409)
        assert elapsed >= REMOVE_TIMEOUT * 0.9
        info = srv.get_ticket(t["uuid"])
        assert info["canceled"] is True
        assert info["active"] is True
        # Canceled at once: new requests are refused.
        assert options_status(srv, t["uuid"]) == 403
    finally:
        con.close()
    assert wait_for(lambda: not srv.get_ticket(t["uuid"])["active"])
    status, _, _ = srv.control("DELETE", f"/tickets/{t['uuid']}")
    assert status == 204
    status, _, _ = srv.control("GET", f"/tickets/{t['uuid']}")
    assert status == 404


def test_cancel_fails_ongoing_put(busy_server, image, make_ticket):
    """An upload in progress when its ticket is canceled is not acknowledged
    (ovirt-imageio answers 403 "was canceled" once the body arrives)."""
    srv = busy_server
    t = make_ticket(srv, image, SIZE, inactivity_timeout=30)
    con = start_stalled_put(srv, t["uuid"])
    try:
        status, _, _ = srv.control("DELETE", f"/tickets/{t['uuid']}")
        assert status == 409
        try:
            con.send(b"a" * 99_000)
            res = con.response("PUT")
        except OSError:
            res = None
        assert res is None or res.status == 403, res
    finally:
        con.close()


def test_inactivity_timeout_closes_idle_connection(server, image, make_ticket):
    import servers

    t = make_ticket(server, image, SIZE, inactivity_timeout=2)
    with servers.RawConnection(server.raw_remote_socket(timeout=15)) as busy:
        with servers.RawConnection(server.raw_remote_socket(timeout=15)) as idle:
            assert idle.request("OPTIONS", f"/images/{t['uuid']}").status == 200
            # A connection with a request every half second stays open.
            for _ in range(7):
                res = busy.request("OPTIONS", f"/images/{t['uuid']}")
                assert res.status == 200
                time.sleep(0.5)
            # The idle one was closed after about 2 seconds.
            assert idle.at_eof(timeout=2.5)
        assert not busy.at_eof(timeout=0.1)


def test_completed_requests_extend_expiry(server, image, make_ticket):
    """Each completed request moves the expiry to timeout seconds later, so
    a ticket in use outlives its timeout."""
    import servers

    t = make_ticket(server, image, SIZE, timeout=2)
    first = server.get_ticket(t["uuid"])["expires"]
    with servers.RawConnection(server.raw_remote_socket(timeout=10)) as con:
        for _ in range(7):
            res = con.request("GET", f"/images/{t['uuid']}", {"Range": "bytes=0-9"})
            assert res.status == 206
            time.sleep(0.5)
    assert server.get_ticket(t["uuid"])["expires"] >= first + 2
