"""Real NBD servers (qemu-nbd, nbdkit) for the NBD client's tests.

Each server listens on a UNIX socket in the test's tmp dir (or a TCP port
on 127.0.0.1) and is killed at teardown. The command lines are the bare
servers with exactly the options a test gives (qemu-nbd's own defaults,
``--shared=1`` included); starting and waiting is ``nbd_servers``'.
"""

from __future__ import annotations

import os
from pathlib import Path

from nbd_servers import Export, free_port, qemu_img, qemu_io, start_process

__all__ = ["Servers", "qemu_img", "qemu_io"]


class Servers:
    """Starts servers for one test and kills them all at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Export] = []
        self._n = 0

    def _address(self, tcp: bool) -> str | tuple[str, int]:
        self._n += 1
        if tcp:
            return ("127.0.0.1", free_port())
        return str(self.tmp / f"nbd{self._n}.sock")

    def qemu_nbd(
        self, image: str | os.PathLike[str], fmt: str, *args: str, tcp: bool = False
    ) -> Export:
        address = self._address(tcp)
        argv = ["qemu-nbd", "--persistent", f"--format={fmt}"]
        if isinstance(address, str):
            argv.append(f"--socket={address}")
        else:
            argv += [f"--bind={address[0]}", f"--port={address[1]}"]
        argv += [*args, str(image)]
        return self._start(argv, address, "qemu-nbd")

    def nbdkit(
        self, plugin: str, *args: str, filters: tuple[str, ...] = (), tcp: bool = False
    ) -> Export:
        address = self._address(tcp)
        argv = ["nbdkit", "-f", "--exit-with-parent"]
        if isinstance(address, str):
            argv += ["--unix", address]
        else:
            argv += ["-i", address[0], "-p", str(address[1])]
        argv += [f"--filter={f}" for f in filters]
        argv += [plugin, *args]
        return self._start(argv, address, "nbdkit")

    def _start(self, argv: list[str], address: str | tuple[str, int],
               name: str) -> Export:
        srv = start_process(argv, address, self.tmp / f"{name}{self._n}.log")
        self.started.append(srv)
        return srv

    def stop(self) -> None:
        for srv in self.started:
            srv.kill()
