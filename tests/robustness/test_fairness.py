"""No client starves another: caps per service, pending connections cut
oldest first, refusals a client reads, buffers nobody can hoard.

Real daemons with small limits, real sockets. Times are bounds a loaded
2-core machine keeps with a wide margin, not measurements.
"""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

import servers
from diskferry.daemon.buffers import BufferPool
from diskferry.daemon.http.connection import Connection
from diskferry.daemon.http.limits import ConnectionLimit, PendingConnections
from diskferry.daemon.turns import default_slots
from diskferry.errors import RequestTimeout
from servers import RawConnection, make_sparse_file, ticket_dict

SIZE = 1 << 20

#: The limited daemon's connection limit; half of it is the local reserve.
LIMIT = 12
REMOTE_SHARE = LIMIT // 2
PENDING = 4


@pytest.fixture(scope="module")
def limited(tmp_path_factory, pki):
    workdir = tmp_path_factory.mktemp("fairness-limited")
    srv = servers.start_server(
        "diskferry", workdir, local_socket="path", pki=pki,
        daemon_options={"connection_limit": LIMIT,
                        "local_reserve": LIMIT,  # capped at half
                        "pending_limit": PENDING})
    yield srv
    srv.stop()


def served(srv, service, path="/images/*", method="OPTIONS"):
    """One request on a new connection; its status, None if refused
    before any answer."""
    con = (srv.local_connection(timeout=10) if service == "unix"
           else srv.remote_connection(timeout=10))
    try:
        con.request(method, path, headers={"Range": "bytes=0-4095"})
        res = con.getresponse()
        res.read()
        return res.status
    finally:
        con.close()


def held_connection(srv, service):
    """A connection that was served once and stays open, retried while
    connections of an earlier test are still closing."""
    deadline = time.monotonic() + 5
    while True:
        sock = (srv.raw_local_socket(timeout=10) if service == "unix"
                else srv.raw_remote_socket(timeout=10))
        con = RawConnection(sock)
        try:
            if con.request("OPTIONS", "/images/*").status == 200:
                return con
        except (OSError, ValueError):
            pass
        con.close()
        assert time.monotonic() < deadline, "no room came back"
        time.sleep(0.05)


def silent_connects(srv, count):
    """``count`` TCP connections to the TLS port that never handshake."""
    socks = []
    for _ in range(count):
        s = socket.create_connection((srv.host, srv.port), timeout=10)
        socks.append(s)
    return socks


def test_remote_peers_cannot_take_the_local_share(limited):
    with contextlib.ExitStack() as stack:
        for _ in range(REMOTE_SHARE):
            stack.enter_context(held_connection(limited, "tls"))
        with RawConnection(limited.raw_remote_socket(timeout=10)) as con:
            res = con.response()  # answered without asking
            assert res.status == 503
            assert res.header("Retry-After") == "2"
        for _ in range(LIMIT - REMOTE_SHARE):
            stack.enter_context(held_connection(limited, "unix"))


def test_unix_client_over_its_cap_reads_503(limited):
    """The request a refused client sends right after connecting is read
    before the connection closes: the client reads the 503, its send
    never fails with EPIPE."""
    with contextlib.ExitStack() as stack:
        for _ in range(LIMIT):
            stack.enter_context(held_connection(limited, "unix"))
        for body in (b"", b"x" * 256 * 1024):
            for _ in range(3):
                con = limited.local_connection(timeout=10)
                try:
                    con.request("PUT" if body else "GET", "/images/none",
                                body=body or None)
                    res = con.getresponse()
                    assert res.status == 503
                    assert res.getheader("Retry-After") == "2"
                    res.read()
                finally:
                    con.close()


def test_silent_connects_cut_oldest_first(limited):
    """Past the pending cap the oldest connection without a request is
    closed: a flood of silent connects never keeps a real client out."""
    socks = silent_connects(limited, PENDING * 5)
    try:
        assert served(limited, "tls") == 200
        # The first ones were closed to make room.
        first = socks[0]
        first.settimeout(5)
        assert first.recv(1) == b""
    finally:
        for s in socks:
            s.close()


def test_thousand_silent_connects_leave_clients_served(daemons):
    """1,000 TCP connects to the TLS port that never handshake: UNIX
    socket clients, and TLS clients too, are served meanwhile."""
    srv = daemons.get("diskferry", local_socket="path")
    socks = silent_connects(srv, 1000)
    try:
        for service in ("unix", "tls") * 5:
            start = time.monotonic()
            assert served(srv, service) == 200
            assert time.monotonic() - start < 2
    finally:
        for s in socks:
            s.close()


def test_first_head_has_the_shorter_deadline():
    """A new connection has its first head within the pre-request
    deadline, when shorter than the head deadline; later heads have the
    head deadline."""
    a, b = socket.socketpair()
    with a, b:
        conn = Connection(a, timeout=10, head_timeout=5,
                          first_head_timeout=0.3)
        b.sendall(b"GET / HTTP/1.1\r\n")
        start = time.monotonic()
        with pytest.raises(RequestTimeout, match="within 0.3 seconds"):
            conn.read_request()
        assert time.monotonic() - start < 2
    a, b = socket.socketpair()
    with a, b:
        conn = Connection(a, timeout=10, head_timeout=0.5,
                          first_head_timeout=5)
        b.sendall(b"GET / HTTP/1.1\r\n")
        with pytest.raises(RequestTimeout, match="within 0.5 seconds"):
            conn.read_request()


# --- buffers nobody can hoard ------------------------------------------------

STALLERS = 70
BIG = 1 << 30
PUT_SIZE = 8 << 20


@pytest.fixture
def two_tickets(daemons, tmp_path):
    """A TLS daemon, a big image others stall on and a small one."""
    srv = daemons.get("diskferry")
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(BIG)
    small = make_sparse_file(tmp_path / "small.raw", SIZE, {0: b"s" * 4096})
    tickets = [ticket_dict(big, BIG), ticket_dict(small, SIZE)]
    for t in tickets:
        srv.add_ticket(t)
    yield srv, tickets[0]["uuid"], tickets[1]["uuid"]
    for t in tickets:
        srv.delete_ticket(t["uuid"])


def stalled_get(srv, ticket_id):
    """A TLS GET of the whole big image whose client reads the head and
    no more: the daemon's send blocks, its buffer lent."""
    con = RawConnection(srv.raw_remote_socket(timeout=10))
    con.send(f"GET /images/{ticket_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    con._read_until(b"\r\n\r\n")
    return con


def trickling_put(srv, ticket_id):
    """A TLS PUT whose body came to its first byte (a trickle)."""
    con = RawConnection(srv.raw_remote_socket(timeout=10))
    con.send(f"PUT /images/{ticket_id} HTTP/1.1\r\nHost: x\r\n"
             f"Content-Range: bytes 0-{PUT_SIZE - 1}/*\r\n"
             f"Content-Length: {PUT_SIZE}\r\n\r\nx".encode())
    return con


@pytest.mark.parametrize("stall", [stalled_get, trickling_put])
def test_stalled_clients_hoard_no_buffer(two_tickets, stall):
    """70 TLS clients stall, each in a request that moves a large range
    (more than the pool's 64 buffers): other clients' 4 KiB TLS GETs on
    another ticket are all served, none in more than a second."""
    srv, big, small = two_tickets
    stalled = []
    try:
        for _ in range(STALLERS):
            stalled.append(stall(srv, big))
        time.sleep(0.5)  # the last ones have their buffer too
        for _ in range(20):
            start = time.monotonic()
            with RawConnection(srv.raw_remote_socket(timeout=10)) as con:
                res = con.request("GET", f"/images/{small}",
                                  {"Range": "bytes=0-4095"})
            assert res.status == 206
            assert res.body == b"s" * 4096
            assert time.monotonic() - start < 1
    finally:
        for con in stalled:
            con.close()


def test_try_take_never_waits():
    pool = BufferPool(limit=1, keep=1)
    a = pool.take(4096)
    start = time.monotonic()
    assert pool.try_take(4096) is None
    assert time.monotonic() - start < 0.5
    pool.give(a)
    b = pool.try_take(4096)
    assert b is a  # the kept one
    pool.give(b)
    assert pool.lent == 0


def test_remote_share_stops_short_of_the_reserve():
    limit = ConnectionLimit(10, reserved=4)
    remote, local = limit.share(), limit.share(reserved=True)
    assert (remote.limit, local.limit) == (6, 10)
    assert all(remote.acquire() for _ in range(6))
    assert not remote.acquire()
    assert all(local.acquire() for _ in range(4))
    assert not local.acquire()  # the whole limit is open
    remote.release()
    assert local.acquire()  # room goes to whoever asks first
    assert not remote.acquire()
    assert ConnectionLimit(10, reserved=100).reserved == 5  # at most half


def test_pending_cuts_the_oldest():
    pending = PendingConnections(2)
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        assert pending.add(pairs[0][0].fileno()) == 0
        assert pending.add(pairs[1][0].fileno()) == 0
        pending.remove(pairs[1][0].fileno())  # it started a request
        assert pending.add(pairs[2][0].fileno()) == 0
        assert pending.add(pairs[1][1].fileno()) == 1
        # The oldest was shut down: its peer reads the end.
        pairs[0][1].settimeout(2)
        assert pairs[0][1].recv(1) == b""
        assert len(pending) == 2
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@pytest.mark.parametrize("transport", ["unix", "tls"])
def test_trickling_bodies_hold_no_turn(daemons, tmp_path, transport):
    """More clients than there are turns to write (``daemon.turns``) stop
    sending in the middle of their PUT bodies: another client's PUT is
    written at once, as each stalled body waits for its client outside
    any turn."""
    srv = daemons.get("diskferry")
    raw_socket = (srv.raw_local_socket if transport == "unix"
                  else srv.raw_remote_socket)
    tickets = []
    for i in range(default_slots() + 3):
        path = tmp_path / f"{i}.raw"
        with open(path, "wb") as f:
            f.truncate(SIZE)
        tickets.append(ticket_dict(path, SIZE))
        srv.add_ticket(tickets[-1])
    stalled = []
    try:
        for t in tickets[:-1]:
            con = RawConnection(raw_socket(timeout=10))
            con.send(f"PUT /images/{t['uuid']} HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Length: {SIZE}\r\n\r\n".encode()
                     + b"t" * (SIZE // 4))
            stalled.append(con)
        time.sleep(0.5)  # each stalled body was written up to its stall
        data = bytes(range(256)) * (SIZE // 256)
        start = time.monotonic()
        with RawConnection(raw_socket(timeout=10)) as con:
            res = con.request("PUT", f"/images/{tickets[-1]['uuid']}",
                              body=data)
            assert res.status == 200
            assert time.monotonic() - start < 2
            res = con.request("GET", f"/images/{tickets[-1]['uuid']}")
        assert res.body == data
    finally:
        for con in stalled:
            con.close()
        for t in tickets:
            srv.delete_ticket(t["uuid"])
