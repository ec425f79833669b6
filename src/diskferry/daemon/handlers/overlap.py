"""Moving a request's data between connection and backend, both at once.

Where the kernel cannot move the data by itself (``sendfile`` from a
file), a worker thread does the backend's half of the copy while the
request's thread does the connection's half. Done in turn, each side
would wait while the other works: the NBD server idle while a chunk goes
to the client, the client while the next chunk is read.

Through memory (TLS, ``O_DIRECT``, NBD under TLS) the connection's
buffer is cut into slots, each owned by one thread at a time and handed
over through two queues::

    request thread                   worker thread
    GET  send slot k to the client   fill slots k+1.. from the backend
    PUT  receive slot k+1            write slot k to the backend

Through pipes (NBD on a plain socket: the data never enters the
process) the pipes themselves are the queue. GET: the worker keeps one
NBD READ in flight per pipe, a pipe's capacity each, so that the server
reads several at once, and splices each reply into its pipe, while the
request's thread splices the pipes to the client in turn and hands each
back when drained. PUT: the request's thread splices the body into one
pipe while the worker splices it into NBD WRITEs. A side that fails
closes its ends of the pipes, so the other never waits on them forever.

The worker alone uses the backend while the request runs and has ended
before the request returns, so a backend still serves one thread at a
time, and a flush after a PUT follows every write. An error on either
side stops both, and the worker's error is raised in the request's
thread. A request that fits in one slot is copied in turn, without a
thread.
"""

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from diskferry.daemon.turns import Turn
from diskferry.errors import BackendError
from diskferry.pipe import Pipe

#: Slots the connection's buffer is cut into: one being sent or received,
#: the others read ahead or waiting to be written.
SLOTS = 4

#: The smallest slot worth a thread; also the alignment of slots, which
#: O_DIRECT needs.
MIN_SLOT = 64 * 1024

#: Bytes moved through a pipe between cancellation checks.
PIPE_CHUNK = 8 * 1024 * 1024

#: Pipes of a spliced GET: NBD READs in flight. Reading a qcow2 exported
#: by qemu-nbd (--cache=none --aio=native, the harness's download-nbd
#: export) to null with nbdcopy on one connection took 1.12-1.31 s with
#: one 1 MiB read in flight and 0.59-0.61 s with four (2-core VM).
GET_PIPES = 4

Slot = TypeVar("Slot")


class _Stopped(Exception):
    """The request's thread failed; the worker gives up (its error is
    dropped: the request's is the one raised)."""


class Connection(Protocol):
    def write(self, data: memoryview) -> None: ...

    def readinto_full(self, view: memoryview,
                      turn: Turn | None = None) -> int: ...

    def send_pipe(self, pipe: Pipe, count: int) -> None: ...

    def splice_body_to_pipe(self, pipe: Pipe, count: int) -> int: ...


class Storage(Protocol):
    def readinto(self, buf: memoryview, offset: int) -> int: ...

    def write(self, data: memoryview, offset: int) -> int: ...


class PipeStorage(Protocol):
    def pipe_piece(self, capacity: int) -> int: ...

    def read_to_pipes(self, pipes: Sequence[Pipe], offset: int, length: int,
                      piece: int, reclaim: Callable[[bool], bool]) -> None: ...

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


def send_spliced(conn: Connection, backend: PipeStorage, pipes: Sequence[Pipe],
                 op: Operation, offset: int, length: int) -> None:
    """``send`` through pipes: backend -> pipes in turn -> connection."""
    piece = backend.pipe_piece(min(pipe.size for pipe in pipes))
    drained = threading.Semaphore(0)
    stopped = threading.Event()

    def reclaim(block: bool) -> bool:
        got = drained.acquire(blocking=block)
        if stopped.is_set():
            raise _Stopped()
        return got

    def work() -> None:
        backend.read_to_pipes(pipes, offset, length, piece, reclaim)

    def run() -> None:
        end = offset + length
        for i, pos in enumerate(range(offset, end, piece)):
            if i % max(1, PIPE_CHUNK // piece) == 0:
                op.check()
            count = min(piece, end - pos)
            conn.send_pipe(pipes[i % len(pipes)], count)
            op.done += count
            drained.release()

    def close_write_ends() -> None:
        for pipe in pipes:
            pipe.close_write()

    def close_read_ends() -> None:
        stopped.set()
        drained.release(len(pipes))
        for pipe in pipes:
            pipe.close_read()

    _stream(work, close_write_ends, run, close_read_ends)


def receive(conn: Connection, backend: Storage, buf: memoryview,
            op: Operation, offset: int, length: int,
            overlapped: bool = True, turn: Turn | None = None) -> None:
    """Write the next ``length`` body bytes of ``conn`` at ``offset``;
    without ``overlapped``, receive the whole buffer and write it in turn.
    With a ``turn``, the body is received in turns (``Connection``'s
    ``readinto_full``).

    A TLS body for local storage is received in turn (a proxied image
    keeps the overlap: its writes wait on the network, not the CPU):
    decrypting keeps the request's thread
    busy, and on two cores a writer thread beside it only adds hand-offs.
    Shared harness, same run, TLS (2-core VM), write-behind against in
    turn: upload-nbd into a new qcow2 through qemu-nbd, pyref 1.39 against
    1.58 GiB/s (daemon and qemu-nbd 0.62 against 0.53 CPU-s/GiB) and the
    ovirt-imageio client 1.13 against 1.54 (0.84 against 0.62); a file
    upload to tmpfs, 0.91 against 0.98 (pyref), 1.08 against 1.10 (curl).
    """
    def fill(slot: memoryview, count: int) -> None:
        conn.readinto_full(slot[:count], turn)

    def drain(slot: memoryview, pos: int, count: int) -> None:
        backend.write(slot[:count], pos)

    slots = slots_of(buf) if overlapped else [buf]
    _write_behind(slots, len(slots[0]), fill, drain, op, offset, length)


def receive_spliced(conn: Connection, backend: PipeStorage, pipe: Pipe,
                    op: Operation, offset: int, length: int) -> None:
    """``receive`` through a pipe: connection -> pipe -> backend."""
    def work() -> None:
        backend.write_from_pipe(pipe, offset, length)

    def run() -> None:
        for pos in range(offset, offset + length, PIPE_CHUNK):
            op.check()
            count = min(PIPE_CHUNK, offset + length - pos)
            done = 0
            while done < count:
                done += conn.splice_body_to_pipe(pipe, count - done)
            op.done += count

    _stream(work, pipe.close_read, run, pipe.close_write)


def _stream(work: Callable[[], None], close_work_end: Callable[[], None],
            run: Callable[[], None], close_run_end: Callable[[], None]) -> None:
    """Run ``work`` in a thread and ``run`` here, each on its end of a pipe.

    A side that fails closes its end, which ends the other's wait on the
    pipe (end of file, or EPIPE). The error raised is the first side's:
    the other's is only its consequence.
    """
    failed: list[BaseException] = []
    stopped = threading.Event()

    def guarded() -> None:
        try:
            work()
        except BaseException as e:
            if not stopped.is_set():
                failed.append(e)  # before closing: it is the cause
        finally:
            close_work_end()

    worker = threading.Thread(target=guarded, name="overlap", daemon=True)
    worker.start()
    try:
        run()
    except BaseException:
        if not failed:
            stopped.set()
        close_run_end()
        worker.join()
        if failed:
            raise failed[0] from None
        raise
    worker.join()
    if failed:
        raise failed[0]


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
