"""A keep-alive connection across ticket changes, on the diskferry daemon."""

import time
import uuid

import pytest

from servers import ticket_dict


@pytest.fixture
def df(daemons):
    return daemons.get("diskferry")


def get(con, path):
    con.request("GET", path)
    res = con.getresponse()
    return res.status, res.read()


def test_replaced_ticket_serves_new_image_on_same_connection(df, tmp_path):
    old = tmp_path / "old.raw"
    new = tmp_path / "new.raw"
    old.write_bytes(b"o" * 4096)
    new.write_bytes(b"n" * 4096)
    tid = str(uuid.uuid4())
    df.add_ticket(ticket_dict(old, 4096, ("read",), uuid=tid))
    con = df.local_connection()
    try:
        assert get(con, f"/images/{tid}") == (200, b"o" * 4096)
        df.add_ticket(ticket_dict(new, 4096, ("read",), uuid=tid))
        assert get(con, f"/images/{tid}") == (200, b"n" * 4096)
        # The connection counts once, for the ticket now installed.
        assert df.get_ticket(tid)["connections"] == 1
    finally:
        con.close()
        df.control("DELETE", f"/tickets/{tid}")


def test_connections_counted_and_released(df, tmp_path):
    image = tmp_path / "img.raw"
    image.write_bytes(b"x" * 4096)
    tid = str(uuid.uuid4())
    df.add_ticket(ticket_dict(image, 4096, ("read",), uuid=tid))
    cons = [df.local_connection(), df.remote_connection()]
    try:
        for con in cons:
            assert get(con, f"/images/{tid}")[0] == 200
        info = df.get_ticket(tid)
        assert info["connections"] == 2
        assert info["transferred"] == 4096  # the same range twice: once
    finally:
        for con in cons:
            con.close()
    deadline = time.monotonic() + 10
    while df.get_ticket(tid)["connections"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert df.get_ticket(tid)["connections"] == 0
    df.control("DELETE", f"/tickets/{tid}")


def test_deleted_ticket_closes_idle_connection_resources(df, tmp_path):
    image = tmp_path / "img.raw"
    image.write_bytes(b"x" * 4096)
    tid = str(uuid.uuid4())
    df.add_ticket(ticket_dict(image, 4096, ("read",), uuid=tid))
    con = df.local_connection()
    try:
        assert get(con, f"/images/{tid}")[0] == 200
        status, _, _ = df.control("DELETE", f"/tickets/{tid}")
        assert status == 204
        assert get(con, f"/images/{tid}")[0] == 403
    finally:
        con.close()
