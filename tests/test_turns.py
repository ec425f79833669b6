"""Turns at receiving upload bodies: how many hold one, in what order,
and bodies (spliced, TLS) that take a turn only for bytes already here."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import ssl
import struct
import termios
import threading
import time

import pytest

from diskferry.daemon.http import connection
from diskferry.daemon.http.connection import Connection
from diskferry.daemon.turns import Turns, default_slots
from diskferry.pipe import Pipe

TIMEOUT = 10


def wait_until(condition, what):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def test_no_more_holders_than_slots():
    turns = Turns(3)
    lock = threading.Lock()
    holding, most = [0], [0]

    def hold():
        for _ in range(20):
            with turns.turn():
                with lock:
                    holding[0] += 1
                    most[0] = max(most[0], holding[0])
                time.sleep(0.001)
                with lock:
                    holding[0] -= 1

    threads = [threading.Thread(target=hold) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert most[0] == 3
    assert turns.waiting == 0


def test_turns_go_in_the_order_asked():
    turns = Turns(1)
    order: list[int] = []
    threads = []
    with turns.turn():
        for i in range(6):
            def take(i=i):
                with turns.turn():
                    order.append(i)
            threads.append(threading.Thread(target=take))
            threads[-1].start()
            wait_until(lambda n=i + 1: turns.waiting == n, f"waiter {i}")
    for t in threads:
        t.join(TIMEOUT)
    assert order == list(range(6))


def test_asking_again_goes_behind_the_waiters():
    """A writer that ends one step and asks at once does not barge in
    ahead of one already waiting."""
    turns = Turns(1)
    order: list[str] = []
    first = turns.turn()
    first.__enter__()
    other = threading.Thread(target=lambda: _record(turns, order, "other"))
    other.start()
    wait_until(lambda: turns.waiting == 1, "the other writer")
    again = threading.Thread(target=lambda: _record(turns, order, "again"))
    first.__exit__(None, None, None)
    again.start()
    for t in (other, again):
        t.join(TIMEOUT)
    assert order == ["other", "again"]


def _record(turns, order, name):
    with turns.turn():
        order.append(name)


def test_a_turn_says_if_it_was_waited_for():
    turns = Turns(1)
    waited = []
    with turns.turn() as first:
        t = threading.Thread(target=lambda: _waited(turns, waited))
        t.start()
        wait_until(lambda: turns.waiting == 1, "the second")
    t.join(TIMEOUT)
    assert (first, waited) == (False, [True])


def _waited(turns, waited):
    with turns.turn() as w:
        waited.append(w)


def test_a_failed_step_gives_its_turn_back():
    turns = Turns(1)
    with pytest.raises(OSError), turns.turn():
        raise OSError("storage failed")
    done = threading.Event()
    t = threading.Thread(target=lambda: (turns.turn().__enter__(),
                                         done.set()))
    t.start()
    assert done.wait(TIMEOUT)


def test_at_least_one_slot():
    with pytest.raises(ValueError):
        Turns(0)
    assert default_slots() >= 2


@pytest.fixture
def body_pair(tmp_path):
    """A client socket, the daemon's Connection at the start of a body of
    ``SIZE`` bytes, a pipe and the file the body goes to."""
    client, server = socket.socketpair()
    conn = Connection(server, timeout=TIMEOUT)
    path = tmp_path / "image.raw"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    pipe = Pipe()
    try:
        yield client, conn, pipe, fd
    finally:
        pipe.close()
        os.close(fd)
        conn.close()
        client.close()


SIZE = 512 * 1024


def test_spliced_body_takes_what_came_while_it_waited(body_pair):
    """The first bytes are received outside any turn; the rest, sent while
    the step waits for its turn, go to the file in that same turn."""
    client, conn, pipe, fd = body_pair
    size = 64 * 1024  # the rest fits in the socket's buffer
    first, rest = os.urandom(4096), os.urandom(size - 4096)
    client.sendall(first)
    conn.start_body(size, expect_continue=False)
    turns = []

    @contextlib.contextmanager
    def turn():
        if not turns:
            client.sendall(rest)
            wait_until(lambda: _queued(conn.sock) == len(rest), "the rest")
        turns.append(conn.body_left)
        yield True  # waited for: the rest came meanwhile

    assert conn.splice_body(fd, 0, size, pipe, turn) == size
    assert turns == [size - 4096]  # one step: 4 KiB waited for, the rest queued
    assert conn.body_left == 0
    assert os.pread(fd, size, 0) == first + rest


def _queued(sock):
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD,
                                          b"\0\0\0\0"))[0]


def sent_slowly(client, data, piece, receive):
    """Send ``data`` in pieces 20 ms apart while ``receive(turn)`` takes
    it; for each piece, whether a turn was held when it was sent."""
    in_turn = threading.Event()

    @contextlib.contextmanager
    def turn():
        in_turn.set()
        yield
        in_turn.clear()

    held = []

    def send_slowly():
        for i in range(0, len(data), piece):
            time.sleep(0.02)
            held.append(in_turn.is_set())
            client.sendall(data[i:i + piece])

    sender = threading.Thread(target=send_slowly)
    sender.start()
    try:
        assert receive(turn) == len(data)
    finally:
        sender.join(TIMEOUT)
    return held


def test_spliced_body_waits_for_the_client_outside_its_turn(body_pair):
    """A body that comes in pieces: every turn starts with bytes in hand,
    none waits for the client."""
    client, conn, pipe, fd = body_pair
    data = os.urandom(SIZE)
    conn.start_body(SIZE, expect_continue=False)
    held = sent_slowly(client, data, 64 * 1024,
                       lambda turn: conn.splice_body(fd, 0, SIZE, pipe, turn))
    assert held == [False] * (SIZE // (64 * 1024))
    assert os.pread(fd, SIZE, 0) == data


@pytest.fixture
def tls_pair(pki):
    """A TLS client socket and the daemon's Connection on the other end
    of a socket pair."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki.cert_file, pki.key_file)
    client_ctx = ssl.create_default_context(cafile=pki.ca_file)
    a, b = socket.socketpair()
    shaken: list[ssl.SSLSocket] = []
    handshake = threading.Thread(target=lambda: shaken.append(
        server_ctx.wrap_socket(a, server_side=True)))
    handshake.start()
    client = client_ctx.wrap_socket(b, server_hostname="localhost")
    handshake.join(TIMEOUT)
    conn = Connection(shaken[0], tls=True, timeout=TIMEOUT)
    try:
        yield client, conn
    finally:
        conn.close()
        client.close()


RECORDS = 8 * 16384


def read_queued_records(client, conn):
    """Eight whole TLS records wait in the socket, then the body is read
    with a turn that notes how much of the body was left, and how much
    each turn moved; both lists."""
    data = os.urandom(RECORDS)
    client.sendall(data)
    wait_until(lambda: _queued(conn.sock) >= RECORDS, "the records")
    conn.start_body(RECORDS, expect_continue=False)
    left, moved = [], []

    @contextlib.contextmanager
    def turn():
        left.append(conn.body_left)
        yield
        moved.append(left[-1] - conn.body_left)

    buf = bytearray(RECORDS)
    assert conn.readinto_full(memoryview(buf), turn) == RECORDS
    assert bytes(buf) == data
    assert conn.body_left == 0
    return left, moved


def test_tls_body_decrypts_what_came_in_one_turn(tls_pair):
    """Eight records wait in the socket: the first is received outside
    any turn, the next six in one turn, the last outside again (it is
    smaller than the largest record, so it might not be whole)."""
    left, moved = read_queued_records(*tls_pair)
    assert (left, moved) == ([RECORDS - 16384], [6 * 16384])


def test_tls_body_waits_for_the_client_outside_its_turn(tls_pair):
    client, conn = tls_pair
    size = 16 * 16384
    data = os.urandom(size)
    conn.start_body(size, expect_continue=False)
    buf = bytearray(size)
    held = sent_slowly(client, data, 32768,
                       lambda turn: conn.readinto_full(memoryview(buf), turn))
    assert held == [False] * (size // 32768)
    assert bytes(buf) == data


def test_tls_turn_moves_at_most_its_share(tls_pair, monkeypatch):
    """However much the socket holds, a turn takes at most
    TLS_TURN_BYTES: a connection whose socket buffer grew large must not
    take whole bodies per turn while others take a little."""
    monkeypatch.setattr(connection, "TLS_TURN_BYTES", 2 * 16384)
    _, moved = read_queued_records(*tls_pair)
    # Without the bound: one turn of six records.
    assert moved == [2 * 16384, 2 * 16384]
