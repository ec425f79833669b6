"""The ceilings of the harness's NBD rows: nbdcopy on the same exports.

``download-nbd`` and ``upload-nbd`` go through qemu-nbd, which may itself
be the limit (it reads qcow2 with O_DIRECT, and writing qcow2 allocates
clusters). This measures what nbdcopy (libnbd, C: 4 connections when the
export offers multi-conn, 64 requests in flight) reaches between the same
source and the same kind of qemu-nbd export the harness makes, so that a
row can be read against the machine's limit as well as against
ovirt-imageio:

- download-nbd ceiling: ``sparse.qcow2`` exported read-only as the
  harness does (``--cache=none --aio=native --shared=8
  --allocation-depth``), copied to ``null:``.
- upload-nbd ceiling: ``sparse.raw`` copied into a new qcow2 of its size
  in the destination folder, exported as the harness does
  (``--cache=writeback --discard=unmap --detect-zeroes=unmap --shared=8``),
  then flushed.

GiB/s and CPU seconds are per GiB of virtual size, like the harness's;
CPU is nbdcopy's (client) and qemu-nbd's (server) apart. Run it with the
harness's images made (``run.py`` makes them on its first run):

    python3 bench/nbd_ceilings.py [--quick] [--reps 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

GiB = 1024**3
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system time of a process and its reaped children."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / TICK


def start_qemu_nbd(argv, sock):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{argv} did not start")
        time.sleep(0.01)
    return proc


def stop(server, sock):
    server.terminate()
    server.wait()
    if os.path.exists(sock):  # qemu-nbd removes it when it exits cleanly
        os.unlink(sock)


def timed_nbdcopy(args, server):
    """Wall, client CPU and server CPU of one nbdcopy run."""
    before = cpu_seconds(server.pid)
    start = time.monotonic()
    child = subprocess.Popen(["nbdcopy", *args])
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.monotonic() - start
    if status:
        raise RuntimeError(f"nbdcopy {args} failed: {status}")
    return wall, usage.ru_utime + usage.ru_stime, cpu_seconds(server.pid) - before


def download_ceiling(images, workdir):
    sock = os.path.join(workdir, "download.sock")
    server = start_qemu_nbd(
        ["qemu-nbd", "--socket", sock, "--persistent", "--shared=8",
         "--format", "qcow2", "--read-only", "--cache=none", "--aio=native",
         "--allocation-depth", images["qcow2"]["path"]], sock)
    try:
        return timed_nbdcopy([f"nbd+unix:///?socket={sock}", "null:"], server)
    finally:
        stop(server, sock)


def upload_ceiling(images, workdir, dest_dir):
    sock = os.path.join(workdir, "upload.sock")
    target = os.path.join(dest_dir, "ceiling-upload.qcow2")
    size = images["sparse"]["size"]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", target,
                    str(size)], check=True)
    server = start_qemu_nbd(
        ["qemu-nbd", "--socket", sock, "--persistent", "--shared=8",
         "--format", "qcow2", "--cache=writeback", "--discard=unmap",
         "--detect-zeroes=unmap", target], sock)
    try:
        return timed_nbdcopy(["--flush", images["sparse"]["path"],
                              f"nbd+unix:///?socket={sock}"], server)
    finally:
        stop(server, sock)
        os.unlink(target)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="the harness's --quick images")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--images-dir", default=os.environ.get(
        "BENCH_IMAGES", "/var/tmp/bench-images"))
    p.add_argument("--dest-dir", default="/dev/shm/bench-dst")
    args = p.parse_args()
    images_dir = os.path.join(args.images_dir, "quick" if args.quick
                              else "default")
    with open(os.path.join(images_dir, "images.json")) as f:
        images = json.load(f)["images"]
    os.makedirs(args.dest_dir, exist_ok=True)
    rows = {"download-nbd": lambda d: download_ceiling(images, d),
            "upload-nbd": lambda d: upload_ceiling(images, d, args.dest_dir)}
    virtual = {"download-nbd": images["qcow2"]["size"],
               "upload-nbd": images["sparse"]["size"]}
    print("| ceiling | GiB/s median [min-max] | nbdcopy CPU s/GiB "
          "| qemu-nbd CPU s/GiB |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir:
        for name, run in rows.items():
            runs = [run(workdir) for _ in range(args.reps)]
            gib = virtual[name] / GiB
            speeds = [gib / wall for wall, _, _ in runs]
            client = statistics.median(c for _, c, _ in runs) / gib
            server = statistics.median(s for _, _, s in runs) / gib
            print(f"| {name} nbdcopy | {statistics.median(speeds):.2f} "
                  f"[{min(speeds):.2f}-{max(speeds):.2f}] | {client:.2f} "
                  f"| {server:.2f} |")


if __name__ == "__main__":
    main()
