"""Benchmark: the NBD client reading a fully allocated raw through qemu-nbd,
next to nbdcopy on the same export. Not a test; run by hand:

    .venv/bin/python tests/nbd/bench_client.py [--size-gib 1] [--runs 3]
        [--sizes 256K,1M,4M,8M] [--depths 1,4,8,16]

Prints GiB/s and client CPU seconds per GiB (user + system of this process
for our client, of the child for nbdcopy). The image lives on /dev/shm so
that storage is not what is measured.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

from diskferry.nbd import Client  # noqa: E402

GiB = 1 << 30


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def make_image(path: str, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)


def start_server(image: str, sock: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            "qemu-nbd",
            "--persistent",
            "--shared=8",
            "--read-only",
            "--format=raw",
            f"--socket={sock}",
            image,
        ]
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(sock)
                return proc
            except OSError:
                time.sleep(0.01)
    proc.kill()
    raise RuntimeError("qemu-nbd did not start")


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def bench_client(
    sock: str, size: int, request_size: int, depth: int
) -> tuple[float, float]:
    buf = bytearray(64 << 20)
    with Client(sock, request_size=request_size, queue_depth=depth) as c:
        t0, c0 = time.monotonic(), cpu_self()
        for off in range(0, size, len(buf)):
            n = min(len(buf), size - off)
            c.readinto(memoryview(buf)[:n], off)
        t1, c1 = time.monotonic(), cpu_self()
    gib = size / GiB
    return gib / (t1 - t0), (c1 - c0) / gib


def bench_nbdcopy(sock: str, size: int) -> tuple[float, float]:
    t0, c0 = time.monotonic(), cpu_children()
    subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", "null:"], check=True)
    t1, c1 = time.monotonic(), cpu_children()
    gib = size / GiB
    return gib / (t1 - t0), (c1 - c0) / gib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--sizes", default="256K,1M,2M,4M,8M")
    p.add_argument("--depths", default="1,4,8,16")
    args = p.parse_args()
    size = int(args.size_gib * GiB) >> 20 << 20
    tmp = tempfile.mkdtemp(prefix="diskferry-bench-", dir="/dev/shm")
    image = os.path.join(tmp, "disk.raw")
    sock = os.path.join(tmp, "sock")
    make_image(image, size)
    proc = start_server(image, sock)
    try:
        rates = [bench_nbdcopy(sock, size) for _ in range(args.runs)]
        best = max(rates)
        print(f"nbdcopy               {best[0]:6.2f} GiB/s  {best[1]:5.2f} CPU-s/GiB")
        for rs in (parse_size(s) for s in args.sizes.split(",")):
            for depth in (int(d) for d in args.depths.split(",")):
                rates = [bench_client(sock, size, rs, depth) for _ in range(args.runs)]
                ours = max(rates)
                print(
                    f"client {rs >> 10:5d}K x {depth:2d}  {ours[0]:6.2f} GiB/s  "
                    f"{ours[1]:5.2f} CPU-s/GiB  ({ours[0] / best[0]:.2f}x nbdcopy)"
                )
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
