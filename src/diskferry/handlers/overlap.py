"""Moving a request's data between connection and backend, both at once.

Where no descriptor can be handed to the kernel (an NBD export, TLS,
``O_DIRECT``), data goes through the connection's buffer. Done in turn,
each side waits while the other works: the NBD server is idle while a
chunk goes to the client, and the client while the next chunk is read.
Here the buffer is cut into slots and a worker thread does the backend's
half of the copy on one slot while the request's thread does the
connection's half on another::

    request thread                   worker thread
    GET  send slot k to the client   read slots k+1.. from the backend
    PUT  receive slot k+1            write slot k to the backend

Each slot is owned by one thread at a time, handed over through two
queues; nothing is copied twice. The worker alone uses the backend while
the request runs and has ended before the request returns, so a backend
still serves one thread at a time, and a flush after a PUT follows every
write. An error on either side stops both, and the worker's error is
raised in the request's thread. A request that fits in one slot is
copied in turn, without a thread.
"""

import queue
import threading
from collections.abc import Callable
from typing import Protocol

from diskferry.errors import BackendError

#: Slots the connection's buffer is cut into: one being sent or received,
#: the others read ahead or waiting to be written.
SLOTS = 4

#: The smallest slot worth a thread; also the alignment of slots, which
#: O_DIRECT needs.
MIN_SLOT = 64 * 1024


class Connection(Protocol):
    def write(self, data: memoryview) -> None: ...

    def readinto_full(self, view: memoryview) -> int: ...


class Storage(Protocol):
    def readinto(self, buf: memoryview, offset: int) -> int: ...

    def write(self, data: memoryview, offset: int) -> int: ...


class Operation(Protocol):
    """The ticket operation: checked between chunks, counts bytes done."""

    done: int

    def check(self) -> None: ...


def slots_of(buf: memoryview) -> list[memoryview]:
    """``buf`` cut into up to SLOTS aligned slots (one if it is small)."""
    size = len(buf) // SLOTS // MIN_SLOT * MIN_SLOT
    if size == 0:
        return [buf]
    return [buf[i * size:(i + 1) * size] for i in range(SLOTS)]


def send(conn: Connection, backend: Storage, buf: memoryview, op: Operation,
         offset: int, length: int) -> None:
    """Send ``length`` bytes of the image at ``offset`` to ``conn``."""
    slots = slots_of(buf)
    if len(slots) == 1 or length <= len(slots[0]):
        _send_in_turn(conn, backend, buf, op, offset, length)
        return
    chunk = len(slots[0])
    free: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    ready: queue.SimpleQueue[tuple[int, int] | BaseException] = \
        queue.SimpleQueue()
    for i in range(len(slots)):
        free.put(i)
    stop = threading.Event()

    def read_ahead() -> None:
        pos, end = offset, offset + length
        try:
            while pos < end:
                slot = free.get()
                if slot is None or stop.is_set():
                    return
                want = min(chunk, end - pos)
                _read_exactly(backend, slots[slot][:want], pos)
                ready.put((slot, want))
                pos += want
        except BaseException as e:
            ready.put(e)

    def run() -> None:
        pos, end = offset, offset + length
        while pos < end:
            op.check()
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            slot, count = item
            conn.write(slots[slot][:count])
            free.put(slot)
            pos += count
            op.done += count

    def wake() -> None:
        stop.set()
        free.put(None)

    _with_worker(read_ahead, run, wake)


def receive(conn: Connection, backend: Storage, buf: memoryview,
            op: Operation, offset: int, length: int) -> None:
    """Write the next ``length`` body bytes of ``conn`` at ``offset``."""
    slots = slots_of(buf)
    if len(slots) == 1 or length <= len(slots[0]):
        _receive_in_turn(conn, backend, buf, op, offset, length)
        return
    chunk = len(slots[0])
    free: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    ready: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
    for i in range(len(slots)):
        free.put(i)
    failed: list[BaseException] = []

    def write_behind() -> None:
        try:
            while (item := ready.get()) is not None:
                slot, pos, count = item
                backend.write(slots[slot][:count], pos)
                op.done += count
                free.put(slot)
        except BaseException as e:
            failed.append(e)
            free.put(None)  # the request's thread may wait for a slot

    def run() -> None:
        pos, end = offset, offset + length
        while pos < end:
            op.check()
            slot = free.get()
            if slot is None:
                break  # the worker failed
            got = conn.readinto_full(slots[slot][:min(chunk, end - pos)])
            ready.put((slot, pos, got))
            pos += got

    def finish() -> None:
        ready.put(None)

    _with_worker(write_behind, run, finish)
    if failed:
        raise failed[0]


def _with_worker(work: Callable[[], None], run: Callable[[], None],
                 finish: Callable[[], None]) -> None:
    """Run ``work`` in a thread while ``run`` runs here; ``finish`` tells
    the worker to end, and it has ended when this returns."""
    worker = threading.Thread(target=work, name="overlap", daemon=True)
    worker.start()
    try:
        run()
    finally:
        finish()
        worker.join()


def _read_exactly(backend: Storage, view: memoryview, offset: int) -> None:
    got = backend.readinto(view, offset)
    if got < len(view):
        raise BackendError(f"Unexpected end of image at {offset + got}")


def _send_in_turn(conn: Connection, backend: Storage, buf: memoryview,
                  op: Operation, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        op.check()
        want = min(len(buf), end - offset)
        _read_exactly(backend, buf[:want], offset)
        conn.write(buf[:want])
        offset += want
        op.done += want


def _receive_in_turn(conn: Connection, backend: Storage, buf: memoryview,
                     op: Operation, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        op.check()
        got = conn.readinto_full(buf[:min(len(buf), end - offset)])
        backend.write(buf[:got], offset)
        offset += got
        op.done += got
