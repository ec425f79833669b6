"""Copies between a transfer URL and a local image served by qemu-nbd.

The copy engine's pieces, for images that are not raw files: each
worker thread has its own NBD connection to one ``qemu-nbd``, driven by
an I/O thread of its own, and two buffers. A piece goes NBD READ ->
buffer -> HTTP PUT (upload) or HTTP GET -> buffer -> NBD WRITE
(download): one copy in the client, and the NBD side of one piece runs
while the HTTP side of the next (read ahead) or the previous (written
behind) does, so that neither waits for the other.

- Upload (``NbdSource``): extents come from the export, ``zero`` from
  ``base:allocation`` and ``hole`` from ``qemu:allocation-depth``, so a
  single layer (``"backing": null``) knows what it leaves to the layers
  below. Runs of zeros inside data are sent as PATCH zero.
- Download (``NbdDestination``): the image is created as ``NAME.part``,
  written, flushed, and renamed only when all of it succeeded, so an
  interrupted download is never taken for a complete one. Zeros are
  written only where they hide a backing file; a fresh image without one
  already reads zeros.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import TypeVar

from diskferry import nbd
from diskferry.client import extents as _extents
from diskferry.client import formats
from diskferry.client.connection import ImageConnection
from diskferry.client.extents import Range
from diskferry.client.partfile import PartFile
from diskferry.client.piece import Cursor, Piece
from diskferry.client.qemunbd import QemuNbd
from diskferry.client.sender import Sender
from diskferry.extent import Extent

T = TypeVar("T")

#: Granularity of zero detection: a qcow2 cluster, the smallest range a
#: qcow2 image can leave unallocated.
ZERO_BLOCK = 64 * 1024

#: Shortest zero run an upload sends as PATCH zero: a request costs more
#: than sending a shorter run as data.
MIN_ZERO_REQUEST = 1024**2


class _Worker:
    """A copy worker's side of qemu-nbd: one NBD connection, used only by
    its own I/O thread, and two buffers taken in turn.

    Pieces come in order and at most two are in hand at once (the one
    on the wire and the one read ahead or written behind), so taking the
    buffers in turn never gives one to two pieces.
    """

    def __init__(self, server: QemuNbd, buffer_size: int) -> None:
        self.client = server.connect()
        self._io = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="diskferry-nbd")
        self._buffers = (bytearray(buffer_size), bytearray(buffer_size))
        self._turn = 0
        #: Pieces in hand, by their end: (buffer, start, NBD I/O).
        self._pieces: dict[int, tuple[bytearray, int, Future[None]]] = {}

    def call(self, func: Callable[[nbd.Client], T]) -> T:
        """Run ``func(client)`` on the I/O thread and wait for it."""
        return self._io.submit(func, self.client).result()

    def _take_buffer(self) -> bytearray:
        buf = self._buffers[self._turn]
        self._turn ^= 1
        for end, (held, _, io) in list(self._pieces.items()):
            if held is buf:
                # Written behind from it: wait (and raise its failure).
                io.result()
                del self._pieces[end]
        return buf

    def read_ahead(self, offset: int, length: int) -> None:
        """Start reading ``[offset, offset+length)`` into a buffer."""
        buf = self._take_buffer()
        self._pieces[offset + length] = (buf, offset, self._io.submit(
            self.client.readinto, memoryview(buf)[:length], offset))

    def read(self, offset: int, end: int) -> tuple[bytearray, int]:
        """The buffer and start of the piece ending at ``end``, read."""
        if end not in self._pieces:
            self.read_ahead(offset, end - offset)
        buf, start, io = self._pieces[end]
        io.result()
        return buf, start

    def sent(self, end: int) -> None:
        """The piece ending at ``end`` is done with its buffer."""
        del self._pieces[end]

    def receive_buffer(self) -> bytearray:
        """A buffer to receive a piece into."""
        return self._take_buffer()

    def write_behind(self, buf: bytearray, start: int, end: int,
                     writes: Callable[[nbd.Client], None]) -> None:
        """Run ``writes(client)``, which reads ``buf``, on the I/O thread."""
        self._pieces[end] = (buf, start, self._io.submit(writes, self.client))

    def drain(self) -> None:
        """Wait for every write behind; raise the first failure."""
        pending = [io for _, _, io in self._pieces.values()]
        self._pieces.clear()
        for io in pending:
            io.result()

    def close(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)
        self.client.close()


class _Workers:
    """One ``_Worker`` per copy thread, made on its first use."""

    def __init__(self, server: QemuNbd, buffer_size: int) -> None:
        self._server = server
        self._buffer_size = buffer_size
        self._local = threading.local()
        self._lock = threading.Lock()
        self.all: list[_Worker] = []

    def get(self) -> _Worker:
        worker: _Worker | None = getattr(self._local, "worker", None)
        if worker is None:
            worker = _Worker(self._server, self._buffer_size)
            with self._lock:
                self.all.append(worker)
            self._local.worker = worker
        return worker

    def close(self) -> None:
        with self._lock:
            workers, self.all = self.all, []
        for worker in workers:
            worker.close()


def _cache_mode(path: str) -> str:
    """O_DIRECT where the file system takes it (not tmpfs): a copy reads
    or writes each byte once, and caching it only evicts what the host
    uses."""
    return "none" if formats.supports_direct_io(path) else "writeback"


def _runs(buf: bytearray, start: int, length: int, detect_zeros: bool,
          min_run: int) -> list[tuple[int, int, bool]]:
    """Data and zero runs of ``buf[start:start+length]``."""
    if not detect_zeros:
        return [(0, length, False)]
    return _extents.zero_runs(buf, length, ZERO_BLOCK, min_run, start)


class NbdSource:
    """A local image in any format qemu reads, served read-only."""

    #: Pieces may go in parallel, in any order.
    sequential = False
    #: A piece is read from qemu-nbd while the one before is sent.
    reads_ahead = True

    def __init__(self, path: str, image: formats.Source, *,
                 single_layer: bool, connections: int, request_size: int,
                 detect_zeros: bool) -> None:
        self.size = image.size
        #: A single layer leaves what it does not allocate untouched.
        self.keeps_holes = single_layer
        self._detect_zeros = detect_zeros
        self.finds_zeros = detect_zeros
        self._server = QemuNbd(image.spec, read_only=True,
                               shared=connections + 1, allocation_depth=True,
                               cache=_cache_mode(path))
        self._workers = _Workers(self._server, request_size)

    def sized(self, image_size: int) -> int:
        return self.size

    def extents(self) -> list[Extent]:
        size = self.size
        result: list[Extent] = self._workers.get().call(
            lambda client: client.extents(0, size))
        return result

    def prefetch(self, piece: Piece) -> None:
        """Read a data piece ahead, while the worker sends the one before."""
        if piece.op == "data":
            self._workers.get().read_ahead(piece.offset, piece.length)

    def send(self, con: ImageConnection, cursor: Cursor,
             sender: Sender) -> None:
        """Send the piece from ``cursor.offset`` to its end (all of it,
        or what a broken connection left unsent)."""
        worker = self._workers.get()
        offset, end = cursor.offset, cursor.end
        buf, start = worker.read(offset, end)
        view = memoryview(buf)[offset - start:end - start]
        for run_start, run_end, zero in _runs(
                buf, offset - start, end - offset, self._detect_zeros,
                MIN_ZERO_REQUEST):
            if zero:
                sender.zero(con, cursor, offset + run_end)
            else:
                sender.write(con, view[run_start:run_end], cursor)
        worker.sent(end)

    def finish(self) -> None:
        """Every piece is sent: nothing to check for an image."""

    def __enter__(self) -> NbdSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._workers.close()
        self._server.close()


class NbdDestination(PartFile):
    """A new local image (qcow2), written through qemu-nbd."""

    #: Pieces may come in parallel, in any order; nothing to resume.
    sequential = False
    done: list[Range] = []

    def __init__(self, path: str, fmt: str, size: int, *,
                 backing_file: str | None, connections: int,
                 request_size: int, detect_zeros: bool) -> None:
        super().__init__(path)
        #: A new image without a backing file reads zeros everywhere.
        self.zeroed = backing_file is None
        self._detect_zeros = detect_zeros
        formats.create(self.part, fmt, size, backing=backing_file)
        try:
            self._server = QemuNbd(
                formats.destination_spec(self.part, fmt), read_only=False,
                shared=connections + 1, cache=_cache_mode(self.part),
                extra=("--discard=unmap", "--detect-zeroes=unmap"))
        except BaseException:
            os.unlink(self.part)
            raise
        self._workers = _Workers(self._server, request_size)

    def receive(self, con: ImageConnection, cursor: Cursor) -> None:
        """GET the piece from ``cursor.offset`` to its end and write it
        into the image behind the next GET."""
        worker = self._workers.get()
        buf = worker.receive_buffer()
        offset, end = cursor.offset, cursor.end
        length = end - offset
        view = memoryview(buf)[:length]
        con.readinto(view, offset)
        runs = _runs(buf, 0, length, self._detect_zeros, ZERO_BLOCK)
        zeroed = self.zeroed

        def writes(client: nbd.Client) -> None:
            for start, stop, zero in runs:
                if not zero:
                    client.write(view[start:stop], offset + start)
                elif not zeroed:
                    client.zero(offset + start, stop - start, punch_hole=True)

        worker.write_behind(buf, offset, end, writes)
        cursor.advance_to(end)

    def zero(self, offset: int, length: int) -> None:
        """Make a range read as zeros, hiding what the backing file has."""
        self._workers.get().call(
            lambda client: client.zero(offset, length, punch_hole=True))

    def commit(self) -> None:
        """Finish every write, flush, stop qemu-nbd (which closes the
        image), then give the image its name."""
        for worker in self._workers.all:
            worker.drain()
            worker.call(lambda client: client.flush())
        self._workers.close()
        self._server.close()
        self._rename()

    def _abandon(self) -> None:
        self._workers.close()
        self._server.kill()


class _ChecksumReader:
    """The three calls ``checksum.compute`` makes, on an NBD export."""

    def __init__(self, client: nbd.Client) -> None:
        self._client = client

    def size(self) -> int:
        return self._client.size

    def extents(self, start: int, length: int) -> list[Extent]:
        return self._client.extents(start, length)

    def readinto(self, buf: memoryview, offset: int) -> int:
        self._client.readinto(buf, offset)
        return len(buf)


def checksum(path: str, fmt: str, *, member: str | None, algorithm: str,
             block_size: int,
             progress: Callable[[int], None] | None = None,
             started: Callable[[int], None] | None = None
             ) -> dict[str, object]:
    """The daemon's checksum of the guest-visible disk of a local image,
    read through qemu-nbd: what ``--verify`` compares. ``started(size)``
    once the disk's size is known, ``progress(n)`` as ``n`` more bytes are
    hashed."""
    from diskferry import checksum as block_hash

    image = formats.open_source(path, fmt, member=member)
    with QemuNbd(image.spec, read_only=True, shared=1,
                 allocation_depth=True) as server:
        client = server.connect()
        try:
            result: dict[str, object] = block_hash.compute(
                _ChecksumReader(client), algorithm, block_size,
                progress=progress, started=started)
            return result
        finally:
            client.close()


def local_checksum(path: str, fmt: str, *, member: str | None = None,
                   progress: Callable[[int], None] | None = None,
                   started: Callable[[int], None] | None = None,
                   algorithm: str | None = None,
                   block_size: int | None = None) -> dict[str, object]:
    """The daemon's checksum of a local image: of its bytes for raw, of
    its guest disk (through qemu-nbd) for any other format."""
    from diskferry import checksum as block_hash

    algorithm = algorithm or block_hash.DEFAULT_ALGORITHM
    block_size = block_size or block_hash.DEFAULT_BLOCK_SIZE
    if fmt == "raw" and member is None:
        result: dict[str, object] = block_hash.compute_file(
            path, algorithm, block_size, progress=progress, started=started)
        return result
    return checksum(path, fmt, member=member, algorithm=algorithm,
                    block_size=block_size, progress=progress, started=started)
