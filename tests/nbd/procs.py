"""Starting real NBD servers (qemu-nbd, nbdkit) for tests.

Each server listens on a UNIX socket in the test's tmp dir (or a TCP port
on 127.0.0.1), and is killed at teardown by its own pid.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT = 10.0


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    address: str | tuple[str, int]
    log: Path
    argv: list[str] = field(default_factory=list)

    @property
    def sock(self) -> str:
        assert isinstance(self.address, str)
        return self.address

    @property
    def uri(self) -> str:
        if isinstance(self.address, str):
            return f"nbd+unix:///?socket={self.address}"
        host, port = self.address
        return f"nbd://{host}:{port}/"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_ready(srv: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(
                f"{srv.argv[0]} exited {srv.proc.returncode}: {srv.log.read_text()}"
            )
        family = socket.AF_UNIX if isinstance(srv.address, str) else socket.AF_INET
        with socket.socket(family) as s:
            try:
                s.connect(srv.address)
                return
            except OSError:
                pass
        time.sleep(0.01)
    srv.kill()
    raise RuntimeError(f"{srv.argv[0]} did not start: {srv.log.read_text()}")


def _start(argv: list[str], address: str | tuple[str, int], log: Path) -> Server:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(proc, address, log, argv)
    _wait_ready(srv)
    return srv


class Servers:
    """Starts servers for one test and kills them all at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Server] = []
        self._n = 0

    def _address(self, tcp: bool) -> str | tuple[str, int]:
        self._n += 1
        if tcp:
            return ("127.0.0.1", free_port())
        return str(self.tmp / f"nbd{self._n}.sock")

    def qemu_nbd(
        self, image: str | os.PathLike[str], fmt: str, *args: str, tcp: bool = False
    ) -> Server:
        address = self._address(tcp)
        argv = ["qemu-nbd", "--persistent", f"--format={fmt}"]
        if isinstance(address, str):
            argv.append(f"--socket={address}")
        else:
            argv += [f"--bind={address[0]}", f"--port={address[1]}"]
        argv += [*args, str(image)]
        srv = _start(argv, address, self.tmp / f"qemu-nbd{self._n}.log")
        self.started.append(srv)
        return srv

    def nbdkit(
        self, plugin: str, *args: str, filters: tuple[str, ...] = (), tcp: bool = False
    ) -> Server:
        address = self._address(tcp)
        argv = ["nbdkit", "-f", "--exit-with-parent"]
        if isinstance(address, str):
            argv += ["--unix", address]
        else:
            argv += ["-i", address[0], "-p", str(address[1])]
        argv += [f"--filter={f}" for f in filters]
        argv += [plugin, *args]
        srv = _start(argv, address, self.tmp / f"nbdkit{self._n}.log")
        self.started.append(srv)
        return srv

    def stop(self) -> None:
        for srv in self.started:
            srv.kill()


def qemu_img(*args: str | os.PathLike[str]) -> str:
    out = subprocess.run(
        ["qemu-img", *map(str, args)], check=True, capture_output=True, text=True
    )
    return out.stdout


def qemu_io(image: str | os.PathLike[str], fmt: str, *commands: str) -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)
