"""What this machine allows, measured in the same run as the transfers.

Each limit moves the benchmark's image the cheapest way that part of a
transfer can be done, so that a transfer's figure reads against it:

- ``page_cache_read``: ``preadv`` from the page cache into one reused
  buffer, what serving a cached image costs at least;
- ``sendfile_unix``: ``os.sendfile`` into a UNIX socket pair drained by
  ``recv_into`` in a thread, the one-copy local path;
- ``tls_in_memory``: Python's ``ssl`` over a socket pair, both ends in
  this process, one stream: TLS's own cost, before any disk or HTTP;
- ``qemu_img_convert``: ``qemu-img convert -n -W`` of the image into a
  file written in full beforehand (as an upload's target), the local
  copy a transfer would like to match.

In-process limits time themselves (no start-up) and count this
process's CPU; ``qemu-img`` is timed as a whole process.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

#: Buffer of the in-process limits, as the daemon's and client's.
BUFFER_SIZE = 8 * 1024**2


class Measure(NamedTuple):
    seconds: float
    cpu: float


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(func: Callable[[], None]) -> Measure:
    """Wall and process CPU seconds of ``func()``."""
    cpu, start = _cpu(), time.monotonic()
    func()
    return Measure(time.monotonic() - start, _cpu() - cpu)


def page_cache_read(path: str) -> Measure:
    buf = bytearray(BUFFER_SIZE)

    def read() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while n := os.preadv(fd, [buf], offset):
                offset += n
        finally:
            os.close(fd)

    return timed(read)


def _drain(sock: socket.socket, size: int) -> None:
    buf = bytearray(BUFFER_SIZE)
    got = 0
    while got < size:
        n = sock.recv_into(buf)
        if not n:
            break
        got += n


def sendfile_unix(path: str) -> Measure:
    size = os.path.getsize(path)
    sender, receiver = socket.socketpair()

    def send() -> None:
        drain = threading.Thread(target=_drain, args=(receiver, size))
        drain.start()
        with open(path, "rb") as f:
            sender.sendfile(f)
        drain.join()

    try:
        return timed(send)
    finally:
        sender.close()
        receiver.close()


def tls_in_memory(size: int, cert_file: str, key_file: str) -> Measure:
    """``size`` bytes through a TLS connection, both ends here."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_file, key_file)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    a, b = socket.socketpair()
    ready = threading.Event()
    server: list[ssl.SSLSocket] = []

    def accept() -> None:
        server.append(server_context.wrap_socket(b, server_side=True))
        ready.set()

    acceptor = threading.Thread(target=accept)
    acceptor.start()
    client = client_context.wrap_socket(a)
    acceptor.join()
    ready.wait()
    data = memoryview(bytearray(BUFFER_SIZE))

    def send() -> None:
        drain = threading.Thread(target=_drain, args=(server[0], size))
        drain.start()
        sent = 0
        while sent < size:
            n = min(len(data), size - sent)
            client.sendall(data[:n])
            sent += n
        drain.join()

    try:
        return timed(send)
    finally:
        client.close()
        server[0].close()


def run_command(argv: list[str]) -> Measure:
    """Wall and CPU seconds of a command run as a whole process (its reaped
    children included); ``RuntimeError`` with its message if it fails."""
    start = time.monotonic()
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert child.stderr is not None
    error = child.stderr.read().decode("utf-8", "replace")
    child.stderr.close()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.monotonic() - start
    if status:
        raise RuntimeError(f"{os.path.basename(argv[0])} failed: "
                           f"{error.strip()[-2000:]}")
    return Measure(seconds, usage.ru_utime + usage.ru_stime)


def qemu_img_convert(src: str, dst: str) -> Measure | None:
    """``qemu-img convert -n -W`` into ``dst``, an existing file of the
    image's size, through the page cache; None without qemu-img."""
    binary = shutil.which("qemu-img")
    if binary is None:
        return None
    return run_command([binary, "convert", "-n", "-W", "-T", "writeback",
                        "-t", "writeback", "-f", "raw", "-O", "raw", src,
                        dst])
