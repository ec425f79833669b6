"""Moving a request's data between connection and backend, both at once.

Where the kernel cannot move the data by itself (``sendfile`` from a
file), it goes through slots: parts of the connection's buffer (TLS,
``O_DIRECT``, NBD), or pipes that an NBD reply is spliced into and the
connection splices out of (NBD on a plain socket: the data never enters
the process). Done in turn, each side waits while the other works: the
NBD server is idle while a chunk goes to the client, and the client
while the next chunk is read. Here a worker thread does the backend's
half of the copy on one slot while the request's thread does the
connection's half on another::

    request thread                   worker thread
    GET  send slot k to the client   fill slots k+1.. from the backend
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
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from diskferry.errors import BackendError
from diskferry.pipe import Pipe

#: Slots the connection's buffer is cut into: one being sent or received,
#: the others read ahead or waiting to be written.
SLOTS = 4

#: The smallest slot worth a thread; also the alignment of slots, which
#: O_DIRECT needs.
MIN_SLOT = 64 * 1024

Slot = TypeVar("Slot")


class Connection(Protocol):
    def write(self, data: memoryview) -> None: ...

    def readinto_full(self, view: memoryview) -> int: ...

    def send_pipe(self, pipe: Pipe, count: int) -> None: ...

    def splice_body_to_pipe(self, pipe: Pipe, count: int) -> int: ...


class Storage(Protocol):
    def readinto(self, buf: memoryview, offset: int) -> int: ...

    def write(self, data: memoryview, offset: int) -> int: ...

    def read_to_pipe(self, pipe: Pipe, offset: int, length: int) -> None: ...

    def write_from_pipe(self, pipe: Pipe, offset: int, length: int) -> None: ...


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
    def fill(slot: memoryview, pos: int, count: int) -> None:
        got = backend.readinto(slot[:count], pos)
        if got < count:
            raise BackendError(f"Unexpected end of image at {pos + got}")

    def drain(slot: memoryview, count: int) -> None:
        conn.write(slot[:count])

    slots = slots_of(buf)
    _read_ahead(slots, len(slots[0]), fill, drain, op, offset, length)


def send_spliced(conn: Connection, backend: Storage, pipes: Sequence[Pipe],
                 op: Operation, offset: int, length: int) -> None:
    """``send`` through pipes: backend -> pipe -> connection in the kernel."""
    _read_ahead(pipes, pipes[0].size, backend.read_to_pipe, conn.send_pipe,
                op, offset, length)


def receive(conn: Connection, backend: Storage, buf: memoryview,
            op: Operation, offset: int, length: int) -> None:
    """Write the next ``length`` body bytes of ``conn`` at ``offset``."""
    def fill(slot: memoryview, count: int) -> None:
        conn.readinto_full(slot[:count])

    def drain(slot: memoryview, pos: int, count: int) -> None:
        backend.write(slot[:count], pos)

    slots = slots_of(buf)
    _write_behind(slots, len(slots[0]), fill, drain, op, offset, length)


def receive_spliced(conn: Connection, backend: Storage, pipes: Sequence[Pipe],
                    op: Operation, offset: int, length: int) -> None:
    """``receive`` through pipes: connection -> pipe -> backend."""
    _write_behind(pipes, pipes[0].size, conn.splice_body_to_pipe,
                  backend.write_from_pipe, op, offset, length)


def _read_ahead(slots: Sequence[Slot], chunk: int,
                fill: Callable[[Slot, int, int], None],
                drain: Callable[[Slot, int], None],
                op: Operation, offset: int, length: int) -> None:
    """``fill(slot, offset, count)`` in the worker, ``drain(slot, count)``
    here, in order."""
    end = offset + length
    if len(slots) == 1 or length <= chunk:
        for pos in range(offset, end, chunk):
            op.check()
            count = min(chunk, end - pos)
            fill(slots[0], pos, count)
            drain(slots[0], count)
            op.done += count
        return
    free: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    ready: queue.SimpleQueue[tuple[int, int] | BaseException] = \
        queue.SimpleQueue()
    for i in range(len(slots)):
        free.put(i)
    stop = threading.Event()

    def work() -> None:
        try:
            for pos in range(offset, end, chunk):
                slot = free.get()
                if slot is None or stop.is_set():
                    return
                count = min(chunk, end - pos)
                fill(slots[slot], pos, count)
                ready.put((slot, count))
        except BaseException as e:
            ready.put(e)

    def run() -> None:
        for _ in range(offset, end, chunk):
            op.check()
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            slot, count = item
            drain(slots[slot], count)
            free.put(slot)
            op.done += count

    def finish() -> None:
        stop.set()
        free.put(None)

    _with_worker(work, run, finish)


def _write_behind(slots: Sequence[Slot], chunk: int,
                  fill: Callable[[Slot, int], object],
                  drain: Callable[[Slot, int, int], object],
                  op: Operation, offset: int, length: int) -> None:
    """``fill(slot, count)`` here, ``drain(slot, offset, count)`` in the
    worker, in order."""
    end = offset + length
    if len(slots) == 1 or length <= chunk:
        for pos in range(offset, end, chunk):
            op.check()
            count = min(chunk, end - pos)
            fill(slots[0], count)
            drain(slots[0], pos, count)
            op.done += count
        return
    free: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    ready: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
    for i in range(len(slots)):
        free.put(i)
    failed: list[BaseException] = []

    def work() -> None:
        try:
            while (item := ready.get()) is not None:
                slot, pos, count = item
                drain(slots[slot], pos, count)
                op.done += count
                free.put(slot)
        except BaseException as e:
            failed.append(e)
            free.put(None)  # the request's thread may wait for a slot

    def run() -> None:
        for pos in range(offset, end, chunk):
            op.check()
            slot = free.get()
            if slot is None:
                return  # the worker failed
            count = min(chunk, end - pos)
            fill(slots[slot], count)
            ready.put((slot, pos, count))

    def finish() -> None:
        ready.put(None)

    _with_worker(work, run, finish)
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
