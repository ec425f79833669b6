"""Images that are not raw: diskferry's client against ovirt-imageio's.

Rows, each on one diskferry daemon (UNIX socket and TLS), the same run:

- upload-qcow2: the harness's ``sparse.qcow2`` uploaded into a fresh
  sparse raw ticket (the client reads it through its own qemu-nbd);
- download-qcow2: a ticket on ``sparse.raw`` downloaded into a new qcow2;
- holes-8t / holes-1g: a qcow2 of 8 TiB holding 1 GiB of data, and one
  of 1 GiB holding the same data, each uploaded into a sparse ticket of
  its size: what holes cost.

Clients: ``diskferry`` (this repository's CLI) and ``imageio-client``
(the ``ovirt_imageio.client`` library 2.5.1 that ``scripts/setup
--test`` installs as a test peer, kept off the UNIX socket for TLS rows
by answering its locality check False). References: a local ``qemu-img
convert -W -m 16`` between the same source and the same kind of
destination, and for downloads ``nbdcopy`` into a qcow2 served by
``qemu-nbd`` as a client serves it: the most any client writing through
qemu-nbd reaches.

GiB/s and CPU seconds are per GiB of virtual size; client CPU includes
the qemu-nbd each client starts (reaped by it), server CPU is the
daemon's. Before each run the sources are read into the page cache and
the new pages the run will write are lent from memory kept warm
(``diskferry.benchmark.warmmemory``); after it, its output is removed.
Images as for ``nbd_ceilings.py`` (``sparse`` and ``qcow2`` in
``images.json``):

    .venv/bin/python bench/formats.py [--quick] [--reps 3]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from diskferry.benchmark.limits import page_cache_read, run_command
from diskferry.benchmark.localdaemon import LocalDaemon
from diskferry.benchmark.warmmemory import WarmMemory

GiB = 1024**3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The ovirt_imageio.client library, as a command:
#: OP SRC DST TRANSPORT CAFILE.
IMAGEIO_CLIENT = """
import sys
from ovirt_imageio import client
from ovirt_imageio._internal.backends import http
op, src, dst, transport, cafile = sys.argv[1:]
if transport != "unix":
    http.ConnectionMixin.is_local = lambda self: False
if op == "upload":
    client.upload(src, dst, cafile)
else:
    client.download(src, dst, cafile, fmt="qcow2")
"""


def timed(argv, daemon):
    """Wall, client CPU (with reaped children) and daemon CPU of a run."""
    before = daemon.cpu() if daemon else 0.0
    wall, client = run_command(argv)
    return wall, client, daemon.cpu() - before if daemon else 0.0


def drop(path):
    for p in (path, path + ".part"):
        if os.path.exists(p):
            os.unlink(p)


def fresh(path, size):
    drop(path)
    with open(path, "wb") as f:
        f.truncate(size)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--images-dir", default=os.environ.get(
        "BENCH_IMAGES", "/var/tmp/bench-images"))
    p.add_argument("--dest-dir", default="/dev/shm/bench-formats")
    p.add_argument("--venv", default=os.path.join(ROOT, ".venv"))
    p.add_argument("--max-writers", type=int,
                   help="the daemon's [backend_file] max_writers")
    args = p.parse_args()
    imageio = [os.path.join(args.venv, "bin", "python"), "-c",
               IMAGEIO_CLIENT]
    ours = os.path.join(args.venv, "bin", "diskferry")
    images_dir = os.path.join(args.images_dir,
                              "quick" if args.quick else "default")
    with open(os.path.join(images_dir, "images.json")) as f:
        images = json.load(f)["images"]
    qcow2, sparse = images["qcow2"], images["sparse"]
    os.makedirs(args.dest_dir, exist_ok=True)
    dst = args.dest_dir
    workdir = tempfile.mkdtemp(prefix="bench-formats-")
    warm = WarmMemory(max(sparse["data_bytes"], GiB) + 64 * 1024**2)
    daemon = LocalDaemon(
        f"[backend_file]\nmax_writers = {args.max_writers}\n"
        if args.max_writers else "")
    try:
        rows = []
        holes_data = GiB // 4 if args.quick else GiB
        h8 = os.path.join(dst, "holes-8t.qcow2")
        h1 = os.path.join(dst, "holes-small.qcow2")
        for path, size in ((h8, 8 * 1024 * GiB), (h1, holes_data)):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path,
                            str(size)], check=True)
            subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                            f"write -P 0x5a 0 {holes_data}", path],
                           check=True, stdout=subprocess.DEVNULL)

        def upload_case(source, size, name):
            target = os.path.join(dst, f"{name}-target.raw")

            def prepare():
                fresh(target, size)
                return daemon.url(target, size, ("read", "write"),
                                  sparse=True)
            return target, prepare

        cases = []
        target, prep = upload_case(qcow2["path"], qcow2["size"], "up")
        for transport, unix in (("unix", "auto"), ("tls", "never")):
            cases.append(("upload-qcow2", transport, "diskferry", prep,
                          lambda url, t=transport, u=unix: [
                              ours, "upload", "--quiet", "--unix", u,
                              "--cafile", daemon.ca_file, qcow2["path"], url],
                          qcow2["size"]))
            cases.append(("upload-qcow2", transport, "imageio-client", prep,
                          lambda url, t=transport: [
                              *imageio, "upload", qcow2["path"], url, t,
                              daemon.ca_file],
                          qcow2["size"]))
        out = os.path.join(dst, "down.qcow2")

        def prep_down():
            drop(out)
            return daemon.url(sparse["path"], sparse["size"], ("read",))
        for transport, unix in (("unix", "auto"), ("tls", "never")):
            cases.append(("download-qcow2", transport, "diskferry", prep_down,
                          lambda url, u=unix: [
                              ours, "download", "--quiet", "--unix", u,
                              "--format", "qcow2", "--cafile",
                              daemon.ca_file, url, out], sparse["size"]))
            cases.append(("download-qcow2", transport, "imageio-client",
                          prep_down, lambda url, t=transport: [
                              *imageio, "download", url, out, t,
                              daemon.ca_file], sparse["size"]))
        for name, path, size in (("holes-8t", h8, 8 * 1024 * GiB),
                                 ("holes-small", h1, holes_data)):
            _, prep_h = upload_case(path, size, name)
            cases.append((name, "unix", "diskferry", prep_h,
                          lambda url, path=path: [
                              ours, "upload", "--quiet", "--cafile",
                              daemon.ca_file, path, url], size))
        conv_raw = os.path.join(dst, "convert.raw")
        conv_qcow2 = os.path.join(dst, "convert.qcow2")
        nbd_qcow2 = os.path.join(dst, "nbdcopy.qcow2")

        def prep_nbd_qcow2():
            drop(nbd_qcow2)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                            nbd_qcow2, str(sparse["size"])], check=True)
        references = [
            ("upload-qcow2", "qemu-img convert", lambda: drop(conv_raw),
             ["qemu-img", "convert", "-W", "-m", "16", "-f", "qcow2", "-O",
              "raw", qcow2["path"], conv_raw], qcow2["size"]),
            ("download-qcow2", "qemu-img convert", lambda: drop(conv_qcow2),
             ["qemu-img", "convert", "-W", "-m", "16", "-f", "raw", "-O",
              "qcow2", sparse["path"], conv_qcow2], sparse["size"]),
            # What any client writing a qcow2 through qemu-nbd can reach.
            ("download-qcow2", "nbdcopy > qemu-nbd", prep_nbd_qcow2,
             ["nbdcopy", "--", sparse["path"], "[", "qemu-nbd", "-f", "qcow2",
              "--discard=unmap", "--detect-zeroes=unmap", nbd_qcow2, "]"],
             sparse["size"]),
        ]

        # Every run writes at most the images' data (or the holes
        # images'), metadata aside, into new pages.
        outputs = [os.path.join(dst, f"{name}-target.raw")
                   for name in ("up", "holes-8t", "holes-small")]
        outputs += [out, conv_raw, conv_qcow2, nbd_qcow2]
        writes = max(sparse["data_bytes"], holes_data) + 64 * 1024**2

        def measure(prep, argv, with_daemon):
            """One run: sources in the page cache, warm pages lent for what
            it writes, every output removed after it."""
            target = prep()
            for source in (qcow2["path"], sparse["path"]):
                page_cache_read(source)
            warm.lend(writes)
            result = timed(argv(target), daemon if with_daemon else None)
            for path in outputs:
                drop(path)
            warm.take_back()
            return result

        results = {}
        for _ in range(args.reps):
            for op, transport, client, prep, argv, size in cases:
                results.setdefault((op, transport, client, size), []).append(
                    measure(prep, argv, True))
            for op, name, prep, argv, size in references:
                results.setdefault((op, "local", name, size), []).append(
                    measure(prep, lambda _, argv=argv: argv, False))
        print("| op | transport | client | GiB/s median [min-max] "
              "| client CPU s/GiB | server CPU s/GiB | wall s |")
        print("|---|---|---|---|---|---|---|")
        for (op, transport, client, size), runs in results.items():
            gib = size / GiB
            speeds = [gib / w for w, _, _ in runs]
            rows.append((op, transport, client))
            print(f"| {op} | {transport} | {client} | "
                  f"{statistics.median(speeds):.2f} "
                  f"[{min(speeds):.2f}-{max(speeds):.2f}] | "
                  f"{statistics.median(c for _, c, _ in runs) / gib:.3f} | "
                  f"{statistics.median(s for _, _, s in runs) / gib:.3f} | "
                  f"{statistics.median(w for w, _, _ in runs):.2f} |")
    finally:
        daemon.close()
        warm.close()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
