"""The benchmark: images, transfers, limits, and the report.

Transfers are the ``diskferry`` command run as a user runs it, timed as
a whole process (start-up included, as a script that calls it pays);
its CPU is the client's, the daemon's CPU over the same interval the
server's. Each case runs ``reps`` times, interleaved (every case once,
then again), so that the machine's drift hits all alike; the report
gives the median and the spread.

The conditions are those of the transfer benchmark the project is
measured with, so that the figures agree with it: the source image is
read into the page cache before each run, the upload target is written
in full once (its pages exist before the first run), and a download
writes a new file into memory the benchmark kept warm (``warmmemory``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

from diskferry.benchmark import limits
from diskferry.benchmark.localdaemon import LocalDaemon
from diskferry.benchmark.warmmemory import WarmMemory

GiB = 1024**3
MiB = 1024**2

#: (transport, the client's --unix mode for it).
TRANSPORTS = (("unix", "auto"), ("tls", "never"))
OPS = ("download", "upload")


@dataclass
class Row:
    """One measured case: per GiB of image, medians of ``runs``."""

    name: str
    kind: str  # "transfer" or "limit"
    runs: list[limits.Measure] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    size: int = 0

    def summary(self) -> dict[str, object]:
        gib = self.size / GiB
        speeds = [gib / m.seconds for m in self.runs if m.seconds > 0]
        out: dict[str, object] = {
            "name": self.name, "kind": self.kind, "runs": len(self.runs),
            "gib_s": round(statistics.median(speeds), 3),
            "gib_s_min": round(min(speeds), 3),
            "gib_s_max": round(max(speeds), 3),
            "client_cpu_s_per_gib": round(
                statistics.median(m.cpu for m in self.runs) / gib, 3),
        }
        if self.server_cpu:
            out["server_cpu_s_per_gib"] = round(
                statistics.median(self.server_cpu) / gib, 3)
        return out


def make_image(path: str, size: int) -> None:
    """Fully allocated, incompressible, every MiB distinct: one random
    MiB with the offset stamped at its start."""
    block = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        for offset in range(0, size, MiB):
            block[:8] = offset.to_bytes(8, "little")
            f.write(block[:min(MiB, size - offset)])


def write_zeros(path: str, size: int) -> None:
    """A file of ``size`` zero bytes, every page of it written."""
    zeros = bytes(MiB)
    with open(path, "wb") as f:
        for offset in range(0, size, MiB):
            f.write(zeros[:min(MiB, size - offset)])


def available_memory() -> int:
    """``MemAvailable`` of /proc/meminfo in bytes; 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def warm_memory(size: int) -> WarmMemory | None:
    """Memory to lend to downloads, where the machine has room for it
    beside the image, its page cache and two destinations."""
    if available_memory() > 6 * size:
        return WarmMemory(size)
    return None


def scratch_folder(size: int) -> str:
    """Where destinations go: tmpfs when it has room (no disk in the way
    of the figures), else the temporary folder."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and shutil.disk_usage(shm).free > 3 * size:
        return shm
    return tempfile.gettempdir()


def _remove(*paths: str) -> None:
    for path in paths:
        for p in (path, path + ".part"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def run(size: int = 2 * GiB, reps: int = 3, folder: str | None = None,
        progress: Callable[[str], None] = lambda text: None
        ) -> list[dict[str, object]]:
    """Measure; return one summary per row (transfers, then limits)."""
    base = folder or tempfile.gettempdir()
    work = os.path.join(base, f"diskferry-bench-{os.getpid()}")
    dest = os.path.join(scratch_folder(size), f"diskferry-bench-{os.getpid()}")
    os.makedirs(work)
    os.makedirs(dest, exist_ok=True)
    try:
        image = os.path.join(work, "image.raw")
        progress(f"making a {size / GiB:g} GiB image")
        make_image(image, size)
        warm = warm_memory(size)
        if warm is None:
            progress("too little memory to keep warm: downloads write "
                     "into whatever pages the machine gives")
        try:
            with LocalDaemon() as daemon:
                rows = _transfers(daemon, image, size, reps, dest, warm,
                                  progress)
                rows += _limits(daemon, image, size, reps, dest, progress)
        finally:
            if warm is not None:
                warm.close()
        return [row.summary() for row in rows]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)


def _transfers(daemon: LocalDaemon, image: str, size: int, reps: int,
               dest: str, warm: WarmMemory | None,
               progress: Callable[[str], None]) -> list[Row]:
    command = [sys.executable, "-m", "diskferry"]
    downloaded = os.path.join(dest, "download.raw")
    target = os.path.join(dest, "upload.raw")
    write_zeros(target, size)
    rows = {(op, transport): Row(f"{op} {transport}", "transfer", size=size)
            for op in OPS for transport, _ in TRANSPORTS}
    for rep in range(reps):
        progress(f"transfers, run {rep + 1} of {reps}")
        for op in OPS:
            for transport, unix in TRANSPORTS:
                options = ["--quiet", "--unix", unix, "--cafile",
                           daemon.ca_file]
                if op == "download":
                    url = daemon.url(image, size, ("read",))
                    argv = [*command, "download", *options, url, downloaded]
                else:
                    url = daemon.url(target, size, ("read", "write"))
                    argv = [*command, "upload", *options, image, url]
                limits.page_cache_read(image)
                if warm is not None and op == "download":
                    warm.lend(size)
                before = daemon.cpu()
                measure = limits.run_command(argv)
                row = rows[(op, transport)]
                row.runs.append(measure)
                row.server_cpu.append(daemon.cpu() - before)
                _remove(downloaded)
                if warm is not None:
                    warm.take_back()
    _remove(downloaded, target)
    return list(rows.values())


def _limits(daemon: LocalDaemon, image: str, size: int, reps: int,
            dest: str, progress: Callable[[str], None]) -> list[Row]:
    progress("this machine's limits")
    pki = os.path.join(daemon.folder, "pki")
    converted = os.path.join(dest, "convert.raw")
    write_zeros(converted, size)
    cases: list[tuple[str, Callable[[], limits.Measure | None]]] = [
        ("page-cache read", lambda: limits.page_cache_read(image)),
        ("sendfile>unix", lambda: limits.sendfile_unix(image)),
        ("TLS in memory", lambda: limits.tls_in_memory(
            size, os.path.join(pki, "server.pem"),
            os.path.join(pki, "server.key"))),
        ("qemu-img convert", lambda: limits.qemu_img_convert(image,
                                                             converted)),
    ]
    rows = []
    for name, measure in cases:
        row = Row(name, "limit", size=size)
        for _ in range(reps):
            found = measure()
            if found is None:
                break
            row.runs.append(found)
        if row.runs:
            rows.append(row)
    _remove(converted)
    return rows
