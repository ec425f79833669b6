"""Exports the daemon runs itself: a private ``qemu-nbd`` per format ticket.

A ``file:`` ticket with a ``format`` other than raw serves the guest data
of an image in any format qemu reads. The daemon checks the image and
starts its export when the ticket is added, and the images API then
reads and writes it through the NBD backend, as it serves an export
vdsm started::

    ticket add  --> qemu-img info (format, encryption, backing chain,
                    size, bitmap)  --> qemu-nbd on RUN_DIR/exports/*.sock
    request     --> NBD backend --> the export (started again if it died)
    ticket end  --> qemu-nbd stopped (delete, expiry while idle, daemon
                    stop; PR_SET_PDEATHSIG when the daemon is killed)

Starting at add, not on first use, makes qemu say at once what is wrong
(an image a running VM holds is refused with qemu's reason, while the
ticket is added, never later to a client) and holds the image's lock for
the ticket's life, so that no VM starts on the image while it is served.

Every qemu-nbd is started by one thread that lives as long as the
daemon: the kernel's ``PR_SET_PDEATHSIG`` follows the thread that
started a child, and a control connection's thread ends with the
connection.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import secrets
import shutil
import signal
import subprocess
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from typing import IO

from diskferry.client import formats
from diskferry.client.errors import UnsupportedFormat
from diskferry.daemon.config import Config
from diskferry.daemon.tickets import TicketExport, TicketSpec
from diskferry.errors import BadRequest, ExportFailed
from diskferry.qemuprocess import (
    blockdev_filename,
    die_with_parent,
    log_message,
    wait_serving,
)

log = logging.getLogger("diskferry.daemon.exports")

#: Folder of the run directory that holds the exports' sockets (0700).
FOLDER = "exports"

#: Name of an export's socket and log: a random name, since the ticket id
#: is a secret.
_PREFIX = "export-"

#: Seconds qemu-nbd may take to open the image and listen.
START_TIMEOUT = 30.0

#: Seconds an orderly stop (SIGTERM: flush, close) may take before SIGKILL.
STOP_TIMEOUT = 60.0

#: NBD connections an export takes beyond ``[daemon] max_connections``:
#: a client that opens a connection while its last one is being closed
#: must not wait for qemu-nbd to notice.
SPARE_CONNECTIONS = 2

#: Seconds between looks for expired tickets whose export can stop.
EXPIRY_INTERVAL = 1.0

#: Longest socket path the kernel takes (sun_path, with its NUL).
_MAX_SOCKET_PATH = 107


def qemu_nbd_argv(spec: TicketSpec, source: formats.Source, socket_path: str,
                  shared: int, direct_io: bool) -> list[str]:
    """The qemu-nbd command line serving a ticket's image."""
    argv = ["qemu-nbd", f"--socket={socket_path}", "--persistent",
            f"--shared={shared}", "--allocation-depth"]
    if direct_io:
        argv += ["--cache=none", "--aio=native"]
    else:
        argv += ["--cache=writeback", "--aio=threads"]
    if spec.read_only:
        argv.append("--read-only")
    elif spec.sparse:
        argv.append("--discard=unmap")
    if spec.bitmap is not None:
        argv.append(f"--bitmap={spec.bitmap}")
    argv.append(blockdev_filename(source.spec))
    return argv


def check_image(spec: TicketSpec, path: str) -> formats.Source:
    """The image as qemu reads it, or ``BadRequest`` naming the problem:
    not of the ticket's format, encrypted, a backing file that does not
    open, smaller than the ticket, no such bitmap."""
    try:
        source = formats.open_source(path, spec.format,
                                     single_layer=not spec.backing_chain)
    except UnsupportedFormat as e:
        raise BadRequest(f"Invalid ticket: {e}") from e
    if spec.size > source.size:
        raise BadRequest(f"Invalid ticket field 'size': {spec.size} is more "
                         f"than the image's virtual size {source.size}")
    if spec.bitmap is not None:
        bitmaps = image_bitmaps(source.chain[0])
        if spec.bitmap not in bitmaps:
            raise BadRequest(
                f"Invalid ticket field 'bitmap': {path} has no bitmap "
                f"{spec.bitmap!r} (its bitmaps: {', '.join(bitmaps) or 'none'})")
    return source


def image_bitmaps(layer: dict[str, object]) -> list[str]:
    """The persistent bitmaps of a layer, as ``qemu-img info`` shows it."""
    specific = layer.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    found = data.get("bitmaps") if isinstance(data, dict) else None
    if not isinstance(found, list):
        return []
    return [str(b.get("name")) for b in found if isinstance(b, dict)]


def _death(returncode: int, message: str) -> str:
    """How a qemu-nbd ended, in words."""
    if returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"was killed by signal {-returncode}"
    else:
        how = f"exited with status {returncode}"
    return f"qemu-nbd {how}" + (f": {message}" if message else "")


Spawn = Callable[[Sequence[str], IO[bytes]], "subprocess.Popen[bytes]"]


class QemuNbdExport:
    """One ticket's qemu-nbd; thread-safe.

    ``url()`` starts it again when it died, or when it was stopped since
    (an expired ticket extended and used again).
    """

    def __init__(self, argv: Sequence[str], socket_path: str,
                 spawn: Spawn) -> None:
        self.argv = tuple(argv)
        self.socket_path = socket_path
        self._log_path = socket_path.removesuffix(".sock") + ".log"
        self._spawn = spawn
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self) -> str:
        with self._lock:
            proc = self._proc
            if proc is None or _has_ended(proc):
                if proc is not None:
                    log.warning("export %s: %s; starting it again",
                                self.socket_path, self._ended(proc))
                self._start()
        return f"nbd:unix:{self.socket_path}"

    def start(self) -> None:
        """Start serving; ``ExportFailed`` with qemu's words if it cannot."""
        with self._lock:
            self._start()

    def failure(self) -> str | None:
        """How the export died, if it did (None while it runs, or until
        the thread that reaps it has recorded its end: a request that
        lost its connection waits for that; this look costs no system
        call, since every GET asks)."""
        proc = self._proc
        if proc is None or proc.returncode is None:
            return None
        return self._ended(proc)

    def describe(self) -> dict[str, object]:
        proc = self._proc
        running = proc is not None and proc.returncode is None
        return {"kind": "qemu-nbd",
                "url": f"nbd:unix:{self.socket_path}",
                "pid": proc.pid if proc is not None and running else None,
                "running": running,
                "command": list(self.argv)}

    def stop(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            _terminate(proc)
            self._remove_files()
        log.info("export %s: stopped", self.socket_path)

    def _start(self) -> None:
        self._remove_files()
        with open(self._log_path, "wb") as stderr:
            proc = self._spawn(self.argv, stderr)
        try:
            self._wait_listening(proc)
        except BaseException:
            _terminate(proc)
            self._remove_files()
            raise
        self._proc = proc
        # Reaped as soon as it ends: no zombie (``Popen.poll`` answers
        # None while another thread waits: ``_has_ended`` asks the
        # kernel).
        threading.Thread(target=proc.wait, name=f"qemu-nbd-{proc.pid}",
                         daemon=True).start()
        log.info("export %s: qemu-nbd %d serving", self.socket_path, proc.pid)

    def _wait_listening(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            serving = wait_serving(proc, self.socket_path, START_TIMEOUT)
        except TimeoutError as e:
            raise ExportFailed(str(e)) from None
        if not serving:
            raise ExportFailed(self._ended(proc))

    def _ended(self, proc: subprocess.Popen[bytes]) -> str:
        return _death(proc.returncode, log_message(self._log_path))

    def _remove_files(self) -> None:
        """qemu-nbd removes its socket when it stops, not when it fails
        or is killed."""
        for path in (self.socket_path, self._log_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _has_ended(proc: subprocess.Popen[bytes]) -> bool:
    """Whether ``proc`` ended (its ``returncode`` is then set). The thread
    that reaps it may not have recorded its end yet, or even run: the
    kernel says (``WNOWAIT`` leaves the status to that thread)."""
    if proc.returncode is not None:
        return True
    try:
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        if os.waitid(os.P_PID, proc.pid, flags) is None:
            return False
    except ChildProcessError:
        pass    # Reaped: its status is being recorded.
    proc.wait()
    return True


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (qemu-nbd flushes and closes the image), then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ExportManager:
    """The exports of one daemon: started for tickets (``start_export``
    is the ticket store's ``StartExport``), watched for expiry, and all
    gone when the daemon stops."""

    def __init__(self, config: Config) -> None:
        self.folder = os.path.join(config.run_dir, FOLDER)
        self.shared = config.daemon.max_connections + SPARE_CONNECTIONS
        self._launcher = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="export-launcher")
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None

    def open(self, stop_idle: Callable[[], None]) -> None:
        """Make the folder, remove what a killed daemon left in it (the
        run directory's lock says no other daemon uses it), and call
        ``stop_idle`` every ``EXPIRY_INTERVAL``."""
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        os.chmod(self.folder, 0o700)
        for name in os.listdir(self.folder):
            if name.startswith(_PREFIX):
                os.unlink(os.path.join(self.folder, name))
        self._watcher = threading.Thread(
            target=self._watch, args=(stop_idle,), name="export-expiry",
            daemon=True)
        self._watcher.start()

    def _watch(self, stop_idle: Callable[[], None]) -> None:
        while not self._closed.wait(EXPIRY_INTERVAL):
            try:
                stop_idle()
            except Exception:
                log.exception("stopping the exports of expired tickets")

    def close(self) -> None:
        """Stop watching; the exports were stopped with their tickets."""
        self._closed.set()
        if self._watcher is not None:
            self._watcher.join()
        self._launcher.shutdown()

    def start_export(self, spec: TicketSpec) -> TicketExport | None:
        """Check the ticket's image and start its export (None for a raw
        ticket); ``BadRequest`` with qemu's words otherwise."""
        if not spec.exported:
            return None
        return self.serve(spec)

    def serve(self, spec: TicketSpec) -> QemuNbdExport:
        """Check the ticket's image and start its export, raw as well
        (a shut off domain's backup holds each disk's lock)."""
        path = urllib.parse.unquote(urllib.parse.urlsplit(spec.url).path)
        source = check_image(spec, path)
        socket_path = os.path.join(
            self.folder, f"{_PREFIX}{secrets.token_hex(6)}.sock")
        if len(socket_path.encode()) > _MAX_SOCKET_PATH:
            raise ExportFailed(f"the run directory's path is too long for "
                               f"a socket: {socket_path}")
        argv = qemu_nbd_argv(spec, source, socket_path, self.shared,
                             formats.supports_direct_io(path))
        export = QemuNbdExport(argv, socket_path, self._spawn)
        try:
            export.start()
        except ExportFailed as e:
            raise BadRequest(f"Cannot serve {path} as {spec.format}: "
                             f"{e}") from e
        return export

    def _spawn(self, argv: Sequence[str],
               stderr: IO[bytes]) -> subprocess.Popen[bytes]:
        binary = shutil.which(argv[0])
        if binary is None:
            raise ExportFailed("qemu-nbd not found: format tickets need it "
                               "(Debian package qemu-utils)")
        command = [binary, *argv[1:]]
        return self._launcher.submit(_popen, command, stderr).result()


def _popen(argv: Sequence[str], stderr: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=stderr,
                            preexec_fn=_export_child)


def _export_child() -> None:
    """Before exec: die with the launcher thread; a socket only its owner
    may use (0600)."""
    die_with_parent()
    os.umask(0o177)
