"""Ticket validation, lifecycle and accounting, without sockets."""

import threading
import time

import pytest

from diskferry.daemon import backends
from diskferry.daemon.tickets import TicketStore
from diskferry.errors import (
    BadRequest,
    Forbidden,
    TicketForbidden,
    TicketInUse,
    TicketNotFound,
)


def store_of(**kw):
    """A store that checks URLs as the daemon's does."""
    return TicketStore(backends.check_url, **kw)


def ticket(**kw):
    d = {"uuid": "t1", "size": 1024, "url": "file:///var/tmp/x.raw",
         "ops": ["read"], "timeout": 300}
    d.update(kw)
    return {k: v for k, v in d.items() if v is not None}


@pytest.mark.parametrize("kw,field", [
    ({"uuid": None}, "uuid"),
    ({"uuid": 5}, "uuid"),
    ({"size": None}, "size"),
    ({"size": "1"}, "size"),
    ({"size": -1}, "size"),
    ({"size": True}, "size"),
    ({"url": None}, "url"),
    ({"url": "ftp://x/y"}, "url"),
    ({"url": "file:relative"}, "url"),
    ({"ops": None}, "ops"),
    ({"ops": "read"}, "ops"),
    ({"ops": ["delete"]}, "ops"),
    ({"timeout": None}, "timeout"),
    ({"timeout": 1.5}, "timeout"),
    ({"inactivity_timeout": "x"}, "inactivity_timeout"),
    ({"sparse": 1}, "sparse"),
    ({"dirty": "yes"}, "dirty"),
    ({"transfer_id": 3}, "transfer_id"),
    ({"filename": []}, "filename"),
])
def test_invalid_field_is_named(kw, field):
    with pytest.raises(BadRequest, match=repr(field)):
        store_of().add(ticket(**kw))


def test_url_is_checked_by_the_check_given():
    seen = []

    def refuse_all(url):
        seen.append(url.geturl())
        raise ValueError("no backend here")

    with pytest.raises(BadRequest,
                       match="Invalid ticket field 'url': no backend here"):
        TicketStore(refuse_all).add(ticket())
    assert seen == ["file:///var/tmp/x.raw"]
    assert TicketStore(lambda url: None).add(ticket(url="ftp://x/y")).spec.url \
        == "ftp://x/y"


def test_uuid_must_match_url():
    with pytest.raises(BadRequest, match="uuid"):
        store_of().add(ticket(uuid="a"), "b")


def test_not_an_object():
    with pytest.raises(BadRequest):
        store_of().add(["uuid"])


def test_add_replace_get_remove():
    store = store_of()
    store.add(ticket())
    assert store.get("t1").size == 1024
    store.add(ticket(size=2048))
    assert store.get("t1").size == 2048
    store.remove("t1")
    store.remove("t1")  # idempotent
    with pytest.raises(TicketNotFound):
        store.get("t1")


def test_authorize():
    store = store_of()
    store.add(ticket(ops=["write"]))
    assert store.authorize("t1", "read").uuid == "t1"  # write implies read
    store.add(ticket(uuid="ro"))
    with pytest.raises(TicketForbidden, match="write"):
        store.authorize("ro", "write")
    with pytest.raises(TicketForbidden, match="No such ticket"):
        store.authorize("nope", "read")


def test_expiry_and_extend():
    store = store_of()
    store.add(ticket(timeout=0))
    with pytest.raises(TicketForbidden, match="expired"):
        store.authorize("t1", "read")
    store.get("t1").extend(100)
    store.authorize("t1", "read")


def test_completed_operation_extends_expiry():
    store = store_of()
    t = store.add(ticket(timeout=50))
    t.expires -= 40
    with t.operation(0):
        pass
    assert t.expires >= int(time.monotonic()) + 49


def test_transferred_counts_overlaps_once():
    t = store_of().add(ticket())
    for offset, n in ((0, 100), (50, 100), (500, 10)):
        with t.operation(offset) as op:
            op.done = n
    assert t.info()["transferred"] == 160


def test_transferred_includes_ongoing():
    t = store_of().add(ticket())
    with t.operation(0) as op:
        op.done = 30
        info = t.info()
        assert info["transferred"] == 30
        assert info["active"] is True
        assert info["idle_time"] == 0
    assert t.info()["active"] is False


def test_transferred_absent_for_read_write():
    t = store_of().add(ticket(ops=["read", "write"]))
    assert "transferred" not in t.info()


def test_info_fields():
    t = store_of(default_inactivity=77).add(
        ticket(transfer_id="x", filename="disk.raw", sparse=True))
    info = t.info()
    assert info["inactivity_timeout"] == 77
    assert info["transfer_id"] == "x"
    assert info["filename"] == "disk.raw"
    assert info["sparse"] is True
    assert info["connections"] == 0
    assert info["canceled"] is False


def test_connections_counted_and_closed_on_cancel():
    store = store_of()
    t = store.add(ticket())
    closed = []
    t.add_connection("c1", lambda: closed.append("c1"))
    t.add_connection("c2", lambda: closed.append("c2"))
    assert t.info()["connections"] == 2
    t.remove_connection("c2")
    store.remove("t1")
    assert closed == ["c1"]
    with pytest.raises(TicketForbidden):
        t.add_connection("c3", lambda: None)


def test_cancel_waits_for_operation_then_409():
    store = store_of(remove_timeout=0.2)
    t = store.add(ticket())
    with pytest.raises(Forbidden, match="canceled"):
        with t.operation(0) as op:
            with pytest.raises(TicketInUse):
                store.remove("t1")
            # Canceled at once: new requests and further chunks are refused.
            with pytest.raises(TicketForbidden):
                store.authorize("t1", "read")
            with pytest.raises(Forbidden):
                op.check()
        # Ending a canceled operation raises: its work is not acknowledged.
    # Still there until a delete succeeds.
    assert store.get("t1").canceled
    store.remove("t1")
    with pytest.raises(TicketNotFound):
        store.get("t1")


def test_cancel_returns_when_operation_ends():
    store = store_of(remove_timeout=5)
    t = store.add(ticket())
    started = threading.Event()
    outcome = []

    def work():
        try:
            with t.operation(0):
                started.set()
                time.sleep(0.2)
        except Forbidden as e:
            outcome.append(e)

    worker = threading.Thread(target=work)
    worker.start()
    started.wait()
    begin = time.monotonic()
    store.remove("t1")
    assert 0.05 < time.monotonic() - begin < 4
    worker.join()
    assert len(store) == 0
    assert outcome, "an operation canceled while running must fail"


def test_clear():
    store = store_of()
    store.add(ticket())
    store.add(ticket(uuid="t2"))
    store.clear()
    assert len(store) == 0
