"""One ``qemu-nbd`` process serving a local image to this client.

Any format qemu reads is copied the same way: ``qemu-nbd`` exposes the
guest-visible disk on a UNIX socket in a private folder, and the copy
engine reads or writes it with ``diskferry.nbd``. The image is named by
a ``json:`` filename (a blockdev tree), so qemu guesses nothing: not the
format, not a protocol hidden in a file name.

The server must never outlive the copy. It is stopped by ``close()``
(SIGTERM, which flushes, then SIGKILL), and asked by the kernel to die
with the thread that started it (``PR_SET_PDEATHSIG``), so that even a
client killed with SIGKILL leaves no ``qemu-nbd`` behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from types import TracebackType

from diskferry import nbd
from diskferry.client.errors import ClientError
from diskferry.qemuprocess import blockdev_filename as blockdev_filename
from diskferry.qemuprocess import die_with_parent, log_message, wait_serving

#: Seconds qemu-nbd may take to open the image and listen.
START_TIMEOUT = 30.0

#: Seconds an orderly stop (SIGTERM: flush, close) may take.
STOP_TIMEOUT = 60.0


class QemuNbdError(ClientError):
    """qemu-nbd is missing, or could not serve the image (its message)."""


class QemuNbd:
    """``qemu-nbd`` serving ``spec`` (a blockdev tree) on a private socket.

    ``read_only`` for a source, ``shared`` for the connections the copy
    opens at once; ``cache="none"`` (O_DIRECT, where the file system has
    it) keeps the image's bytes out of the page cache; ``extra`` are
    further qemu-nbd options (for example ``--discard=unmap``).
    """

    def __init__(self, spec: dict[str, object], *, read_only: bool,
                 shared: int, allocation_depth: bool = False,
                 cache: str = "writeback",
                 extra: Sequence[str] = ()) -> None:
        binary = shutil.which("qemu-nbd")
        if binary is None:
            raise QemuNbdError(
                "qemu-nbd not found: it is needed to read or write images "
                "that are not raw (Debian package qemu-utils)")
        self._folder = tempfile.mkdtemp(prefix="diskferry-nbd-")
        self.socket_path = os.path.join(self._folder, "nbd.sock")
        self._log_path = os.path.join(self._folder, "qemu-nbd.log")
        argv = [binary, f"--socket={self.socket_path}", "--persistent",
                f"--shared={shared}", f"--cache={cache}"]
        if cache == "none":
            # O_DIRECT: native AIO, and no copy through the page cache.
            argv.append("--aio=native")
        if read_only:
            argv.append("--read-only")
        if allocation_depth:
            argv.append("--allocation-depth")
        argv += [*extra, blockdev_filename(spec)]
        self.argv = argv
        with open(self._log_path, "wb") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=die_with_parent)
        try:
            self._wait_listening()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"nbd:unix:{self.socket_path}"

    def connect(self, **options: object) -> nbd.Client:
        """A new NBD connection to the image."""
        return nbd.open_client(self.url, **options)

    def _wait_listening(self) -> None:
        try:
            serving = wait_serving(self._proc, self.socket_path,
                                   START_TIMEOUT)
        except TimeoutError as e:
            raise QemuNbdError(str(e)) from None
        if not serving:
            raise QemuNbdError(
                f"qemu-nbd cannot serve the image: {self._message()}")

    def _message(self) -> str:
        return (log_message(self._log_path)
                or f"exit status {self._proc.returncode}")

    def close(self) -> None:
        """Stop the server (SIGTERM: it flushes and closes the image)."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._folder, ignore_errors=True)

    def kill(self) -> None:
        """Stop at once, without flushing (the image is thrown away)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.close()

    def __enter__(self) -> QemuNbd:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.kill()
