"""Copies between a transfer URL and a local image served by qemu-nbd.

The copy engine's pieces, for images that are not raw files: each
worker thread has its own NBD connection to one ``qemu-nbd`` and its own
buffer, and a piece goes NBD READ -> buffer -> HTTP PUT (upload) or
HTTP GET -> buffer -> NBD WRITE (download): one copy in the client.

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

import os
import threading
from types import TracebackType
from typing import Any

from diskferry import nbd
from diskferry.client import extents as _extents
from diskferry.client import formats
from diskferry.client.qemunbd import QemuNbd
from diskferry.extent import Extent

#: Granularity of zero detection: a qcow2 cluster, the smallest range a
#: qcow2 image can leave unallocated.
ZERO_BLOCK = 64 * 1024

#: Shortest zero run an upload sends as PATCH zero: a request costs more
#: than sending a shorter run as data.
MIN_ZERO_REQUEST = 1024**2


class _PerThread:
    """One NBD connection and one buffer for each worker thread."""

    def __init__(self, server: QemuNbd, buffer_size: int) -> None:
        self._server = server
        self._buffer_size = buffer_size
        self._local = threading.local()
        self._lock = threading.Lock()
        self.clients: list[nbd.Client] = []

    def get(self) -> tuple[nbd.Client, bytearray]:
        local = self._local
        if not hasattr(local, "client"):
            client = self._server.connect()
            with self._lock:
                self.clients.append(client)
            local.client = client
            local.buffer = bytearray(self._buffer_size)
        return local.client, local.buffer

    def close(self) -> None:
        with self._lock:
            clients, self.clients = self.clients, []
        for client in clients:
            client.close()


def _runs(buf: bytearray, length: int, detect_zeros: bool,
          min_run: int) -> list[tuple[int, int, bool]]:
    if not detect_zeros:
        return [(0, length, False)]
    return _extents.zero_runs(buf, length, ZERO_BLOCK, min_run)


class NbdSource:
    """A local image in any format qemu reads, served read-only."""

    def __init__(self, path: str, fmt: str, *, member: str | None,
                 single_layer: bool, connections: int, request_size: int,
                 detect_zeros: bool) -> None:
        image = formats.open_source(path, fmt, member=member,
                                    single_layer=single_layer)
        self.size = image.size
        #: A single layer leaves what it does not allocate untouched.
        self.keeps_holes = single_layer
        self._detect_zeros = detect_zeros
        self._server = QemuNbd(image.spec, read_only=True,
                               shared=connections + 1, allocation_depth=True)
        self._workers = _PerThread(self._server, request_size)

    def extents(self) -> list[Extent]:
        client, _ = self._workers.get()
        return client.extents(0, self.size)

    def send(self, con: Any, state: dict[str, int], end: int,
             sender: Any) -> None:
        """Read ``[state offset, end)`` from the image and send it."""
        client, buf = self._workers.get()
        offset = state["offset"]
        length = end - offset
        view = memoryview(buf)[:length]
        client.readinto(view, offset)
        for start, stop, zero in _runs(buf, length, self._detect_zeros,
                                       MIN_ZERO_REQUEST):
            if zero:
                sender.zero(con, state, offset + stop)
            else:
                sender.write(con, view[start:stop], state)

    def __enter__(self) -> NbdSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._workers.close()
        self._server.close()


class NbdDestination:
    """A new local image (qcow2), written through qemu-nbd."""

    def __init__(self, path: str, fmt: str, size: int, *,
                 backing_file: str | None, connections: int,
                 request_size: int, detect_zeros: bool) -> None:
        self.path = path
        self._part: str | None = path + ".part"
        #: A new image without a backing file reads zeros everywhere.
        self.zeroed = backing_file is None
        self._detect_zeros = detect_zeros
        formats.create(self._part, fmt, size, backing=backing_file)
        try:
            cache = ("none" if formats.supports_direct_io(self._part)
                     else "writeback")
            self._server = QemuNbd(
                formats.destination_spec(self._part, fmt), read_only=False,
                shared=connections + 1, cache=cache,
                extra=("--discard=unmap", "--detect-zeroes=unmap"))
        except BaseException:
            os.unlink(self._part)
            raise
        self._workers = _PerThread(self._server, request_size)

    def receive(self, con: Any, state: dict[str, int], end: int,
                report: Any) -> None:
        """GET ``[state offset, end)`` and write it into the image."""
        client, buf = self._workers.get()
        offset = state["offset"]
        length = end - offset
        view = memoryview(buf)[:length]
        con.readinto(view, offset)
        for start, stop, zero in _runs(buf, length, self._detect_zeros,
                                       ZERO_BLOCK):
            if not zero:
                client.write(view[start:stop], offset + start)
            elif not self.zeroed:
                client.zero(offset + start, stop - start, punch_hole=True)
        report(length)
        state["offset"] = end

    def zero(self, offset: int, length: int) -> None:
        """Make a range read as zeros, hiding what the backing file has."""
        client, _ = self._workers.get()
        client.zero(offset, length, punch_hole=True)

    def commit(self) -> None:
        """Flush, stop qemu-nbd (which closes the image), then give the
        image its name."""
        for client in self._workers.clients:
            client.flush()
        self._workers.close()
        self._server.close()
        assert self._part is not None
        os.rename(self._part, self.path)
        self._part = None

    def __enter__(self) -> NbdDestination:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._part is None:
            return
        self._workers.close()
        self._server.kill()
        try:
            os.unlink(self._part)
        except FileNotFoundError:
            pass


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
             progress: Any = None
             ) -> dict[str, object]:
    """The daemon's checksum of the guest-visible disk of a local image,
    read through qemu-nbd: what ``--verify`` compares. ``progress(n)`` as
    ``n`` more bytes are hashed."""
    from diskferry import checksum as block_hash

    image = formats.open_source(path, fmt, member=member)
    with QemuNbd(image.spec, read_only=True, shared=1,
                 allocation_depth=True) as server:
        client = server.connect()
        try:
            result: dict[str, object] = block_hash.compute(  # type: ignore[no-untyped-call]
                _ChecksumReader(client), algorithm, block_size,
                progress=progress)
            return result
        finally:
            client.close()
