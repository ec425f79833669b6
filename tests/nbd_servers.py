"""Start and stop real NBD servers (qemu-nbd, nbdkit) for tests.

``start_export(kind, path, ...)`` serves an image file on a UNIX socket
next to it and returns an ``Export`` that knows its ticket URL and stops
the server. qemu-nbd is started the way vdsm starts it for a volume
(``--persistent --shared=N``, raw or qcow2, ``--allocation-depth``);
nbdkit serves the file with its ``file`` plugin, optionally through
filters.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

#: How long a server may take to create its socket.
START_TIMEOUT = 10.0

NBD_KINDS = ("qemu-nbd", "nbdkit")


@dataclass
class Export:
    kind: str
    socket: str
    proc: subprocess.Popen = field(repr=False)
    log_path: str = ""

    @property
    def url(self) -> str:
        """ovirt-imageio's form, as vdsm writes it in tickets."""
        return f"nbd:unix:{self.socket}"

    @property
    def uri(self) -> str:
        """The standard NBD URI (nbdcopy, nbdinfo)."""
        return f"nbd+unix:///?socket={self.socket}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> Export:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def qemu_nbd_argv(path, sock, *, fmt="raw", shared=8, read_only=False,
                  allocation_depth=None, bitmap=None, cache="writeback",
                  extra=()) -> list[str]:
    """``fmt=None`` for a ``json:`` filename that names its own driver."""
    argv = ["qemu-nbd", "--persistent", f"--shared={shared}",
            f"--socket={sock}", f"--cache={cache}", "--discard=unmap"]
    if fmt is not None:
        argv.append(f"--format={fmt}")
    if read_only:
        argv.append("--read-only")
    if allocation_depth is None:
        allocation_depth = fmt != "raw"
    if allocation_depth:
        argv.append("--allocation-depth")
    if bitmap:
        argv.append(f"--bitmap={bitmap}")
    return argv + list(extra) + [os.fspath(path)]


def nbdkit_argv(path, sock, *, filters=(), params=(), read_only=False,
                plugin="file") -> list[str]:
    argv = ["nbdkit", "--foreground", f"--unix={sock}"]
    if read_only:
        argv.append("--readonly")
    for f in filters:
        argv.append(f"--filter={f}")
    argv.append(plugin)
    if path is not None:
        argv.append(os.fspath(path))
    return argv + list(params)


def start_export(kind: str, path, *, sock: str | None = None, **options) -> Export:
    """Serve ``path`` with ``kind`` ("qemu-nbd" or "nbdkit") and wait for it."""
    if sock is None:
        base = (Path(path).parent if path is not None and
                os.path.exists(path) else Path("/tmp"))
        sock = str(base / f"nbd-{uuid.uuid4().hex[:8]}.sock")
    if kind == "qemu-nbd":
        argv = qemu_nbd_argv(path, sock, **options)
    elif kind == "nbdkit":
        argv = nbdkit_argv(path, sock, **options)
    else:
        raise ValueError(f"unknown NBD server kind {kind!r}")
    log_path = sock + ".log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True)
    export = Export(kind, sock, proc, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv} exited with {proc.returncode}: "
                               f"{Path(log_path).read_text()[-2000:]}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
            return export
        except OSError:
            time.sleep(0.01)
    export.stop()
    raise RuntimeError(f"{argv} did not create {sock} in {START_TIMEOUT} s")
