"""Start and stop real NBD servers (qemu-nbd, nbdkit) for tests.

``start_export(kind, path, ...)`` serves an image file on a UNIX socket
next to it and returns an ``Export`` that knows its ticket URL and stops
the server. qemu-nbd is started the way vdsm starts it for a volume
(``--persistent --shared=N``, raw or qcow2, ``--allocation-depth``);
nbdkit serves the file with its ``file`` plugin, optionally through
filters. ``start_process`` runs any server command line on a UNIX socket
or a TCP port and waits until it accepts connections.
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

#: How long a server may take to accept connections.
START_TIMEOUT = 10.0

NBD_KINDS = ("qemu-nbd", "nbdkit")

Address = str | tuple[str, int]


@dataclass
class Export:
    address: Address
    proc: subprocess.Popen = field(repr=False)
    log_path: str = ""

    @property
    def sock(self) -> str:
        assert isinstance(self.address, str), "not a UNIX socket"
        return self.address

    @property
    def url(self) -> str:
        """ovirt-imageio's form, as vdsm writes it in tickets."""
        if isinstance(self.address, str):
            return f"nbd:unix:{self.address}"
        return "nbd:{}:{}".format(*self.address)

    @property
    def uri(self) -> str:
        """The standard NBD URI (nbdcopy, nbdinfo)."""
        if isinstance(self.address, str):
            return f"nbd+unix:///?socket={self.address}"
        return "nbd://{}:{}/".format(*self.address)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM, as an orderly shutdown; SIGKILL if it does not end."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._remove_socket()

    def kill(self) -> None:
        """SIGKILL: the server dies mid-whatever it was doing."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def _remove_socket(self) -> None:
        if isinstance(self.address, str):
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Export:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def qemu_nbd_argv(path, address: Address, *, fmt="raw", shared=8,
                  read_only=False, allocation_depth=None, bitmap=None,
                  cache="writeback", extra=()) -> list[str]:
    """``fmt=None`` for a ``json:`` filename that names its own driver."""
    argv = ["qemu-nbd", "--persistent", f"--shared={shared}",
            f"--cache={cache}", "--discard=unmap"]
    if isinstance(address, str):
        argv.append(f"--socket={address}")
    else:
        argv += [f"--bind={address[0]}", f"--port={address[1]}"]
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


def nbdkit_argv(path, address: Address, *, filters=(), params=(),
                read_only=False, plugin="file") -> list[str]:
    argv = ["nbdkit", "--foreground", "--exit-with-parent"]
    if isinstance(address, str):
        argv.append(f"--unix={address}")
    else:
        argv += ["-i", address[0], "-p", str(address[1])]
    if read_only:
        argv.append("--readonly")
    argv += [f"--filter={f}" for f in filters]
    argv.append(plugin)
    if path is not None:
        argv.append(os.fspath(path))
    return argv + list(params)


def start_export(kind: str, path, *, sock: str | None = None,
                 **options) -> Export:
    """Serve ``path`` with ``kind`` ("qemu-nbd" or "nbdkit") on a UNIX
    socket (next to the image unless ``sock`` is given)."""
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
    return start_process(argv, sock, sock + ".log")


def start_process(argv: list[str], address: Address, log_path) -> Export:
    """Run a server command line; return once it accepts connections."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True)
    export = Export(address, proc, os.fspath(log_path))
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv} exited with {proc.returncode}: "
                               f"{Path(log_path).read_text()[-2000:]}")
        try:
            with socket.socket(family) as s:
                s.connect(address)
            return export
        except OSError:
            time.sleep(0.01)
    export.kill()
    raise RuntimeError(f"{argv} did not accept connections within "
                       f"{START_TIMEOUT} s")


def qemu_img(*args) -> str:
    return subprocess.run(["qemu-img", *map(str, args)], check=True,
                          capture_output=True, text=True).stdout


#: Attempts at creating an encrypted image: qemu-img times its key
#: derivation with the thread's CPU clock and gives up ("Unable to get
#: accurate CPU usage") when a 10 ms tick has not passed, which a loaded
#: machine makes likely.
ENCRYPTED_ATTEMPTS = 5


def create_encrypted_qcow2(path, size: int) -> None:
    """A qcow2 encrypted with LUKS (secret "123456"), made again when
    qemu-img could not time its key derivation."""
    for attempt in range(ENCRYPTED_ATTEMPTS):
        try:
            qemu_img("create", "-f", "qcow2", "--object",
                     "secret,id=sec0,data=123456", "-o",
                     "encrypt.format=luks,encrypt.key-secret=sec0,"
                     "encrypt.iter-time=10", path, size)
            return
        except subprocess.CalledProcessError as e:
            if ("accurate CPU usage" not in e.stderr
                    or attempt + 1 == ENCRYPTED_ATTEMPTS):
                raise


def qemu_io(image, fmt: str, *commands: str) -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)
