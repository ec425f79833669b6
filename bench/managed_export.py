"""A format ticket against the same transfer through a hand-started export.

The harness's ``download-nbd`` and ``upload-nbd`` rows run on NBD
tickets whose ``qemu-nbd`` is started by hand, as vdsm starts it. A
``format: qcow2`` file ticket makes the daemon start that ``qemu-nbd``
itself; this script moves the same bytes both ways, in one run, over
the UNIX socket and TLS, with the diskferry client:

- download-nbd: a qcow2 of ``--size`` (1 of each 16 MiB holds 4 MiB of
  data) read into a sparse raw file. Hand-started export: ``qemu-nbd -r
  --cache=none --aio=native --shared=8 --allocation-depth`` (where the
  file system has O_DIRECT, else writeback), as the harness runs it;
- upload-nbd: the same guest data, from a sparse raw file, into a new
  qcow2. Hand-started export: ``qemu-nbd --cache=writeback
  --discard=unmap --shared=8``.

Server CPU is the daemon's and its qemu-nbd's, whichever started it.
First-request latency is reported apart: ticket add (for a format
ticket: ``qemu-img info`` and the export's start) and the first 4 KiB
GET on a new connection.

    .venv/bin/python bench/managed_export.py [--size 1G] [--reps 3]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from diskferry.benchmark.limits import page_cache_read, run_command
from diskferry.benchmark.localdaemon import LocalDaemon, cpu_seconds

GiB = 1024**3
MiB = 1024**2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qemu_nbd_pids(parent):
    """The qemu-nbd processes whose parent is ``parent``."""
    pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    return [pid for pid in pids if _qemu_nbd_of(pid, parent)]


def _qemu_nbd_of(pid, parent):
    try:
        with open(f"/proc/{pid}/stat") as f:
            head, rest = f.read().rsplit(")", 1)
    except OSError:
        return False
    return head.endswith("(qemu-nbd") and int(rest.split()[1]) == parent


def make_images(folder, size):
    """A qcow2 of ``size`` with 4 MiB of data per 16 MiB, and the same
    guest data as a sparse raw file."""
    qcow2 = os.path.join(folder, "source.qcow2")
    raw = os.path.join(folder, "source.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow2,
                    str(size)], check=True)
    writes = [f"write -P {i % 251} {i * 16 * MiB} {4 * MiB}"
              for i in range(size // (16 * MiB))]
    subprocess.run(["qemu-io", "-f", "qcow2", *sum((["-c", w]
                                                   for w in writes), []),
                    qcow2], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                    qcow2, raw], check=True)
    return qcow2, raw


class Export:
    """A qemu-nbd started by hand, as vdsm starts one."""

    def __init__(self, image, socket_path, options):
        self.socket = socket_path
        self.proc = subprocess.Popen(
            ["qemu-nbd", "--persistent", "--shared=8", "-f", "qcow2",
             f"--socket={socket_path}", *options, image])
        deadline = time.monotonic() + 30
        while not os.path.exists(socket_path):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("qemu-nbd did not start")
            time.sleep(0.01)

    def cpu(self):
        return cpu_seconds(self.proc.pid)

    def close(self):
        self.proc.terminate()
        self.proc.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=GiB)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--source-dir", default="/var/tmp")
    p.add_argument("--dest-dir", default="/dev/shm")
    p.add_argument("--venv", default=os.path.join(ROOT, ".venv"))
    args = p.parse_args()
    ours = os.path.join(args.venv, "bin", "diskferry")
    src = tempfile.mkdtemp(prefix="bench-managed-", dir=args.source_dir)
    dst = tempfile.mkdtemp(prefix="bench-managed-", dir=args.dest_dir)
    daemon = LocalDaemon()
    try:
        qcow2, raw = make_images(src, args.size)
        bench = Bench(daemon, ours, qcow2, raw, dst, args.size)
        for _ in range(args.reps):
            bench.round()
        bench.report()
    finally:
        daemon.close()
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)


class Bench:
    """Every case, a run of each per round, interleaved."""

    def __init__(self, daemon, ours, qcow2, raw, dst, size):
        self.daemon, self.ours = daemon, ours
        self.qcow2, self.raw, self.dst, self.size = qcow2, raw, dst, size
        self.results = {}
        self.latency = {}
        direct = _has_direct_io(qcow2)
        self.read_options = ["-r", "--allocation-depth"] + (
            ["--cache=none", "--aio=native"] if direct
            else ["--cache=writeback"])

    def round(self):
        for op in ("download-nbd", "upload-nbd"):
            for ticket in ("hand-started", "format"):
                for transport in ("unix", "tls"):
                    key = (op, ticket, transport)
                    self.results.setdefault(key, []).append(
                        self.run(op, ticket, transport))

    def run(self, op, ticket, transport):
        """One transfer: (wall, server CPU) in seconds."""
        target = os.path.join(self.dst, "target.qcow2")
        out = os.path.join(self.dst, "out.raw")
        for path in (target, out):
            if os.path.exists(path):
                os.unlink(path)
        if op == "upload-nbd":
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                            target, str(self.size)], check=True)
        image = self.qcow2 if op == "download-nbd" else target
        ops = ("read",) if op == "download-nbd" else ("read", "write")
        export = None
        fields = {"format": "qcow2"}
        if ticket == "hand-started":
            options = (self.read_options if op == "download-nbd"
                       else ["--cache=writeback", "--discard=unmap"])
            export = Export(image, os.path.join(self.dst, "nbd.sock"),
                            options)
            fields = {"url": f"nbd:unix:{export.socket}"}
        start = time.monotonic()
        url = self.daemon.url(image, self.size, ops, sparse=True, **fields)
        added = time.monotonic() - start
        self.latency.setdefault((ticket, op), []).append(
            (added, self._first_read(url)))
        pids = qemu_nbd_pids(self.daemon.proc.pid)
        cpu = self._server_cpu(export, pids)
        page_cache_read(self.qcow2 if op == "download-nbd" else self.raw)
        unix = "always" if transport == "unix" else "never"
        if op == "download-nbd":
            argv = [self.ours, "download", "--quiet", "--unix", unix,
                    "--cafile", self.daemon.ca_file, url, out]
        else:
            argv = [self.ours, "upload", "--quiet", "--unix", unix,
                    "--cafile", self.daemon.ca_file, self.raw, url]
        wall, _ = run_command(argv)
        server = self._server_cpu(export, pids) - cpu
        if export is not None:
            export.close()
        return wall, server

    def _server_cpu(self, export, pids):
        total = self.daemon.cpu()
        total += export.cpu() if export else sum(cpu_seconds(p) for p in pids)
        return total

    def _first_read(self, url):
        argv = ["curl", "-s", "-o", "/dev/null", "--cacert",
                self.daemon.ca_file, "-r", "0-4095", url]
        return run_command(argv).seconds

    def report(self):
        gib = self.size / GiB
        print("| op | ticket | transport | GiB/s median [min-max] "
              "| server CPU s/GiB |")
        print("|---|---|---|---|---|")
        for (op, ticket, transport), runs in self.results.items():
            speeds = [gib / w for w, _ in runs]
            print(f"| {op} | {ticket} | {transport} | "
                  f"{statistics.median(speeds):.2f} "
                  f"[{min(speeds):.2f}-{max(speeds):.2f}] | "
                  f"{statistics.median(s for _, s in runs) / gib:.3f} |")
        print()
        print("| ticket | op | ticket add ms | first 4 KiB GET ms (curl, TLS) |")
        print("|---|---|---|---|")
        for (ticket, op), runs in self.latency.items():
            print(f"| {ticket} | {op} | "
                  f"{statistics.median(a for a, _ in runs) * 1000:.0f} | "
                  f"{statistics.median(g for _, g in runs) * 1000:.0f} |")


def _has_direct_io(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


if __name__ == "__main__":
    sys.exit(main())
