"""Helpers for client tests: images with real holes, a relay that breaks a
connection, and the server's own word on which transport carried data."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import tarfile
import threading
import time

from diskferry.daemon.handlers.app import TICKET_PATHS

MiB = 1024**2

KINDS = ("ovirt-imageio", "diskferry")


def make_image(path, size, layout):
    """Write a raw image; ``layout`` "full" (all data) or "sparse" (a few
    data runs, real holes between). Returns its bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
        if layout == "full":
            f.write(os.urandom(size))
        else:
            for offset, length in sparse_runs(size):
                f.seek(offset)
                f.write(os.urandom(length))
    with open(path, "rb") as f:
        return f.read()


def sparse_runs(size):
    """Data runs of a sparse image: unaligned starts and ends on purpose."""
    return [(0, MiB + 4096), (size // 2 + 512, size // 8),
            (size - MiB - 12345, MiB + 12345)]


def allocated(path):
    return os.stat(path).st_blocks * 512


def empty_image(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# --- server-side evidence -------------------------------------------------

_OVIRT_DATA = re.compile(r"CLOSE connection=\d+ client=(\S+) .*\[(read|write) \d+ ops")


def data_transports(srv, log_offset, ticket_id, wait=3.0):
    """Transports ("local" / "remote") that carried image data since
    ``log_offset`` of the server's log, as the server itself logged them."""
    # The log shows a ticket id shortened (a bearer secret).
    shown = TICKET_PATHS.redact_path(f"/images/{ticket_id}")
    deadline = time.monotonic() + wait
    while True:
        text = srv.log_text()[log_offset:]
        found = set()
        if srv.name == "ovirt-imageio":
            # Data ops are counted per connection when it closes.
            for client, _ in _OVIRT_DATA.findall(text):
                found.add("local" if client == "local" else "remote")
        else:
            for line in text.splitlines():
                if re.search(rf" (GET|PUT) {re.escape(shown)}[ /]", line):
                    found.add("local" if "[local/" in line else "remote")
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def log_offset(srv):
    return len(srv.log_text())


# --- a TCP relay that breaks a connection -----------------------------------


class CuttingRelay:
    """Forwards TCP connections to ``target``; resets the first one after
    ``cut_after`` bytes went in ``direction`` ("up": client to server,
    "down": server to client). TLS passes through untouched."""

    def __init__(self, target, cut_after, direction="up"):
        self.target = target
        self.cut_after = cut_after
        self.direction = direction
        self.cuts = 0
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            first = self.connections == 1
            server = socket.create_connection(self.target)
            budget = [self.cut_after if first else None]
            pair = (client, server)
            up = threading.Thread(target=self._pump, daemon=True, args=(
                client, server, budget if self.direction == "up" else [None],
                pair))
            down = threading.Thread(target=self._pump, daemon=True, args=(
                server, client, budget if self.direction == "down" else [None],
                pair))
            up.start()
            down.start()

    def _pump(self, src, dst, budget, pair):
        try:
            while True:
                data = src.recv(256 * 1024)
                if not data:
                    break
                if budget[0] is not None:
                    if len(data) >= budget[0]:
                        dst.sendall(data[:budget[0]])
                        self.cuts += 1
                        break
                    budget[0] -= len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in pair:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for s in pair:
            s.close()

    def close(self):
        self._stop = True
        self._listener.close()




# --- images in formats other than raw ---------------------------------------

#: Formats ``format_image`` makes, as ``qemu-img info`` names them, and how.
FORMAT_IMAGES = {
    "qcow2": ["-f", "qcow2"],
    "vmdk": ["-f", "vmdk"],
    "vdi": ["-f", "vdi"],
    "vhdx": ["-f", "vhdx"],
    "qed": ["-f", "qed"],
    "vpc": ["-f", "vpc"],
    # A short key derivation: the default takes two seconds on purpose.
    "luks": ["-f", "luks", "--object", "secret,id=s0,data=x",
             "-o", "key-secret=s0,iter-time=10"],
}


def format_image(directory, fmt, size=MiB):
    """Make an image of ``size`` virtual bytes in ``fmt`` (a key of
    ``FORMAT_IMAGES``, "vpc-fixed", "ova" or "qcow2-over-backing") in
    ``directory``; return its path."""
    directory = pathlib.Path(directory)
    if fmt == "ova":
        disk = format_image(directory, "vmdk", size)
        (directory / "vm.ovf").write_text("<Envelope/>\n")
        path = directory / "vm.ova"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            tar.add(directory / "vm.ovf", "vm.ovf")
            tar.add(disk, "disk1.vmdk")
        return path
    if fmt == "qcow2-over-backing":
        base = format_image(directory, "qcow2", size)
        path = directory / "top.qcow2"
        qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", path)
        return path
    if fmt == "vpc-fixed":
        path = directory / "fixed.vhd"
        qemu_img("create", "-f", "vpc", "-o", "subformat=fixed", path, size)
        return path
    path = directory / f"disk.{fmt}"
    if fmt == "luks" and size in _luks_images:
        path.write_bytes(_luks_images[size])
        return path
    if fmt == "luks":
        _create_luks(path, size)
        _luks_images[size] = path.read_bytes()
        return path
    qemu_img("create", *FORMAT_IMAGES[fmt], path, size)
    return path


#: Attempts at creating a LUKS image: qemu-img times its key derivation
#: with the thread's CPU clock and gives up ("Unable to get accurate CPU
#: usage") when a 10 ms tick has not passed, about 1 run in 10 here.
LUKS_ATTEMPTS = 5


def _create_luks(path, size):
    for attempt in range(LUKS_ATTEMPTS):
        try:
            qemu_img("create", *FORMAT_IMAGES["luks"], path, size)
            return
        except subprocess.CalledProcessError as e:
            if (b"accurate CPU usage" not in e.stderr or
                    attempt + 1 == LUKS_ATTEMPTS):
                raise


#: LUKS images made so far, by size: creating one measures the key
#: derivation's speed for seconds, whatever iter-time says.
_luks_images: dict[int, bytes] = {}


def qemu_img(*args):
    subprocess.run(["qemu-img", *map(str, args)], check=True,
                   capture_output=True, timeout=60)
