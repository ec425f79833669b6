"""The overlapped copy between a connection and a backend.

A memory backend and an in-memory connection stand in for the two sides
(the same code runs under real sockets in the conformance suite, which
moves every NBD and TLS request through it); here each side can be made
to fail at a chosen byte, to check that the copy stops, the error comes
through, and no thread is left behind.
"""

import os
import threading

import pytest

from diskferry.daemon.backends.memory import MemoryBackend
from diskferry.daemon.handlers import overlap
from diskferry.errors import BackendError, ConnectionGone

MiB = 1 << 20
SLOT = overlap.MIN_SLOT
BUFFER = overlap.SLOTS * SLOT


class Op:
    def __init__(self, cancel_after=None):
        self.done = 0
        self.cancel_after = cancel_after

    def check(self):
        if self.cancel_after is not None and self.done >= self.cancel_after:
            raise ConnectionGone("canceled")


class Connection:
    """A body to receive and a sink for what is sent; fails at ``fail_at``."""

    def __init__(self, body=b"", fail_at=None):
        self.body = memoryview(body)
        self.pos = 0
        self.sent = bytearray()
        self.fail_at = fail_at

    def write(self, data):
        if self.fail_at is not None and len(self.sent) >= self.fail_at:
            raise ConnectionGone("client went away")
        self.sent += data

    def readinto_full(self, view, turn=None):
        if self.fail_at is not None and self.pos >= self.fail_at:
            raise ConnectionGone("body cut short")
        n = len(view)
        view[:] = self.body[self.pos:self.pos + n]
        self.pos += n
        return n


class FailingBackend(MemoryBackend):
    def __init__(self, content, fail_at):
        super().__init__(content)
        self.fail_at = fail_at
        self.writes = []

    def readinto(self, buf, offset):
        if offset + len(buf) > self.fail_at:
            raise BackendError("EIO")
        return super().readinto(buf, offset)

    def write(self, data, offset):
        if offset + len(data) > self.fail_at:
            raise BackendError("ENOSPC")
        self.writes.append((offset, len(data)))
        return super().write(data, offset)


@pytest.fixture
def no_thread_left():
    before = threading.active_count()
    yield
    assert threading.active_count() == before


@pytest.mark.parametrize("offset,length", [
    (0, 1), (0, SLOT), (0, SLOT + 1), (7, 3 * SLOT + 5), (0, 10 * BUFFER),
    (SLOT - 1, 5 * BUFFER + 3),
])
def test_send_moves_the_range(no_thread_left, offset, length):
    data = os.urandom(offset + length + 100)
    conn, op = Connection(), Op()
    buf = memoryview(bytearray(BUFFER))
    overlap.send(conn, MemoryBackend(data), buf, op, offset, length)
    assert bytes(conn.sent) == data[offset:offset + length]
    assert op.done == length


@pytest.mark.parametrize("overlapped", [True, False])
@pytest.mark.parametrize("offset,length", [
    (0, 1), (0, SLOT + 1), (5, 3 * SLOT + 5), (SLOT - 1, 5 * BUFFER + 3),
])
def test_receive_writes_the_range_only(no_thread_left, offset, length,
                                       overlapped, monkeypatch):
    if not overlapped:  # in turn: no writer thread at all
        monkeypatch.setattr(overlap.threading, "Thread", None)
    body = os.urandom(length)
    image = bytes(range(256)) * ((offset + length) // 256 + 2)
    backend, op = MemoryBackend(image), Op()
    buf = memoryview(bytearray(BUFFER))
    overlap.receive(Connection(body), backend, buf, op, offset, length,
                    overlapped=overlapped)
    expected = image[:offset] + body + image[offset + length:]
    assert backend.data == expected
    assert op.done == length


def test_small_buffer_copies_in_turn(no_thread_left):
    data = os.urandom(3 * SLOT)
    conn = Connection()
    overlap.send(conn, MemoryBackend(data), memoryview(bytearray(SLOT)),
                 Op(), 0, len(data))
    assert bytes(conn.sent) == data


def test_backend_read_error_stops_the_send(no_thread_left):
    data = os.urandom(10 * BUFFER)
    conn = Connection()
    with pytest.raises(BackendError, match="EIO"):
        overlap.send(conn, FailingBackend(data, 3 * BUFFER),
                     memoryview(bytearray(BUFFER)), Op(), 0, len(data))
    # Nothing past the failure was sent, and what was sent is right.
    assert len(conn.sent) <= 3 * BUFFER
    assert bytes(conn.sent) == data[:len(conn.sent)]


def test_client_gone_stops_the_read_ahead(no_thread_left):
    data = os.urandom(10 * BUFFER)
    with pytest.raises(ConnectionGone):
        overlap.send(Connection(fail_at=2 * BUFFER), MemoryBackend(data),
                     memoryview(bytearray(BUFFER)), Op(), 0, len(data))


def test_cancel_between_chunks(no_thread_left):
    data = os.urandom(10 * BUFFER)
    conn = Connection()
    with pytest.raises(ConnectionGone, match="canceled"):
        overlap.send(conn, MemoryBackend(data), memoryview(bytearray(BUFFER)),
                     Op(cancel_after=BUFFER), 0, len(data))
    assert len(conn.sent) < len(data)


def test_backend_write_error_fails_the_receive(no_thread_left):
    body = os.urandom(10 * BUFFER)
    backend = FailingBackend(bytes(len(body)), 4 * BUFFER)
    conn = Connection(body)
    with pytest.raises(BackendError, match="ENOSPC"):
        overlap.receive(conn, backend, memoryview(bytearray(BUFFER)), Op(),
                        0, len(body))
    # The request stopped reading the body soon after the failure.
    assert conn.pos <= 4 * BUFFER + BUFFER
    assert all(off + n <= 4 * BUFFER for off, n in backend.writes)


def test_body_cut_short_writes_only_what_came(no_thread_left):
    body = os.urandom(10 * BUFFER)
    backend = MemoryBackend(bytes(len(body)))
    with pytest.raises(ConnectionGone):
        overlap.receive(Connection(body, fail_at=3 * BUFFER), backend,
                        memoryview(bytearray(BUFFER)), Op(), 0, len(body))
    written = backend.data
    assert written[:3 * BUFFER] == body[:3 * BUFFER]
    assert written[3 * BUFFER:] == bytes(len(body) - 3 * BUFFER)


# --- through a pipe: the pipe is the queue between the two threads ----------

PIPE_DATA = 3 * overlap.PIPE_CHUNK + 12345


class PipeBackend:
    """Writes (GET) or reads (PUT) the pipe as an NBD backend would."""

    def __init__(self, data=b"", fail_at=None):
        self.data = memoryview(data)
        self.received = bytearray()
        self.fail_at = fail_at

    def pipe_piece(self, capacity):
        return capacity // 2

    def read_to_pipes(self, pipes, offset, length, piece, reclaim):
        """Fills the pipes in turn, a piece each; a pipe is reused only
        after ``reclaim`` says it was drained."""
        for i, pos in enumerate(range(offset, offset + length, piece)):
            if i >= len(pipes):
                reclaim(True)
            if self.fail_at is not None and pos >= self.fail_at:
                raise BackendError("EIO")
            view = self.data[pos:min(pos + piece, offset + length)]
            while view:
                view = view[os.write(pipes[i % len(pipes)].w, view):]

    def write_from_pipe(self, pipe, offset, length):
        while len(self.received) < length:
            if self.fail_at is not None and len(self.received) >= self.fail_at:
                raise BackendError("ENOSPC")
            chunk = os.read(pipe.r, 65536)
            if not chunk:
                raise BackendError("the pipe ended early")
            self.received += chunk


class PipeConnection:
    def __init__(self, body=b"", fail_at=None):
        self.body = memoryview(body)
        self.pos = 0
        self.sent = bytearray()
        self.fail_at = fail_at

    def send_pipe(self, pipe, count):
        while count:
            if self.fail_at is not None and len(self.sent) >= self.fail_at:
                raise ConnectionGone("client went away")
            chunk = os.read(pipe.r, min(count, 65536))
            if not chunk:
                raise ConnectionGone("the pipe ended early")
            self.sent += chunk
            count -= len(chunk)

    def splice_body_to_pipe(self, pipe, count):
        if self.fail_at is not None and self.pos >= self.fail_at:
            raise ConnectionGone("body cut short")
        n = min(count, 65536)
        written = os.write(pipe.w, self.body[self.pos:self.pos + n])
        self.pos += written
        return written


@pytest.fixture
def pipe():
    from diskferry.pipe import Pipe

    p = Pipe()
    yield p
    p.close()


@pytest.fixture
def pipes():
    from diskferry.pipe import Pipe

    ps = [Pipe() for _ in range(overlap.GET_PIPES)]
    yield ps
    for p in ps:
        p.close()


def test_send_spliced_streams_the_range(no_thread_left, pipes):
    data = os.urandom(PIPE_DATA + 100)
    conn, op = PipeConnection(), Op()
    overlap.send_spliced(conn, PipeBackend(data), pipes, op, 100, PIPE_DATA)
    assert bytes(conn.sent) == data[100:]
    assert op.done == PIPE_DATA


def test_send_spliced_backend_error_wins(no_thread_left, pipes):
    data = os.urandom(PIPE_DATA)
    with pytest.raises(BackendError, match="EIO"):
        overlap.send_spliced(PipeConnection(), PipeBackend(data, fail_at=MiB),
                             pipes, Op(), 0, PIPE_DATA)


@pytest.mark.parametrize("fail_at", [0, MiB, 5 * MiB])
def test_send_spliced_client_gone_unblocks_the_worker(no_thread_left, pipes,
                                                      fail_at):
    """The worker may be writing a pipe or waiting for one to drain:
    either way it stops."""
    data = os.urandom(PIPE_DATA)
    with pytest.raises(ConnectionGone, match="went away"):
        overlap.send_spliced(PipeConnection(fail_at=fail_at),
                             PipeBackend(data), pipes, Op(), 0, PIPE_DATA)


def test_send_spliced_checks_the_operation(no_thread_left, pipes):
    data = os.urandom(PIPE_DATA)
    with pytest.raises(ConnectionGone, match="canceled"):
        overlap.send_spliced(PipeConnection(), PipeBackend(data), pipes,
                             Op(cancel_after=2 * overlap.PIPE_CHUNK), 0,
                             PIPE_DATA)


def test_receive_spliced_streams_the_body(no_thread_left, pipe):
    body = os.urandom(PIPE_DATA)
    backend, op = PipeBackend(), Op()
    overlap.receive_spliced(PipeConnection(body), backend, pipe, op, 0,
                            PIPE_DATA)
    assert bytes(backend.received) == body
    assert op.done == PIPE_DATA


def test_receive_spliced_backend_error_wins(no_thread_left, pipe):
    body = os.urandom(PIPE_DATA)
    with pytest.raises(BackendError, match="ENOSPC"):
        overlap.receive_spliced(PipeConnection(body),
                                PipeBackend(fail_at=2 * MiB), pipe, Op(), 0,
                                PIPE_DATA)


def test_receive_spliced_body_cut_unblocks_the_worker(no_thread_left, pipe):
    body = os.urandom(PIPE_DATA)
    with pytest.raises((ConnectionGone, BackendError)):
        overlap.receive_spliced(PipeConnection(body, fail_at=MiB),
                                PipeBackend(), pipe, Op(), 0, PIPE_DATA)
