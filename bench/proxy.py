"""The proxy role: a transfer through a proxy against the same transfer
made directly, and through ovirt-imageio 2.5.1 as the proxy.

One diskferry daemon holds the image (the upstream, TLS only: a proxy
reaches a host's daemon over the network). In front of it, a diskferry
proxy and an ovirt-imageio proxy, each a daemon whose ticket URL is the
upstream's transfer URL. The client is the ``diskferry`` command over
TLS (``--unix never``), run as a whole process, downloading and
uploading a fully allocated image:

- direct: client -> upstream
- diskferry-proxy: client -> diskferry proxy -> upstream
- imageio-proxy: client -> ovirt-imageio proxy -> upstream

GiB/s, and CPU seconds per GiB of the client, the proxy and the
upstream apart; cases interleaved, ``--reps`` times. The daemons are
started as the test suite starts them (``tests/servers.py``), with one
CA for all:

    .venv/bin/python bench/proxy.py [--size 1G] [--reps 3]
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import servers  # noqa: E402  (the suite's daemon launcher)
from diskferry.benchmark.limits import run_command  # noqa: E402
from diskferry.benchmark.localdaemon import cpu_seconds  # noqa: E402
from diskferry.benchmark.runner import make_image  # noqa: E402

GiB = 1024**3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1, help="GiB (default 1)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default="/var/tmp")
    args = p.parse_args()
    size = args.size * GiB
    work = tempfile.mkdtemp(prefix="bench-proxy-", dir=args.dir)
    dest = tempfile.mkdtemp(prefix="bench-proxy-", dir="/dev/shm")
    daemons = []
    try:
        pki = servers.make_pki(os.path.join(work, "pki"))
        upstream = servers.start_server("diskferry", os.path.join(work, "up"),
                                        pki=pki, local_socket=None)
        daemons.append(upstream)
        proxies = {}
        for kind in ("diskferry", "ovirt-imageio"):
            proxies[kind] = servers.start_server(
                kind, os.path.join(work, f"proxy-{kind}"), pki=pki)
            daemons.append(proxies[kind])
        image = os.path.join(work, "image.raw")
        make_image(image, size)
        target = os.path.join(dest, "target.raw")
        downloaded = os.path.join(dest, "download.raw")
        with open(target, "wb") as f:
            f.truncate(size)

        def url_for(path, ops, via):
            t = servers.ticket_dict(path, size, ops, uuid=str(uuid.uuid4()))
            upstream.add_ticket(t)
            url = upstream.image_url(t["uuid"])
            if via is None:
                return url
            pt = dict(t, url=url, uuid=str(uuid.uuid4()))
            proxies[via].add_ticket(pt)
            return proxies[via].image_url(pt["uuid"])

        command = [os.path.join(ROOT, ".venv", "bin", "diskferry")]
        cases = {}
        for _ in range(args.reps):
            for op in ("download", "upload"):
                for route, via in (("direct", None),
                                   ("diskferry-proxy", "diskferry"),
                                   ("imageio-proxy", "ovirt-imageio")):
                    if op == "download":
                        for p_ in (downloaded, downloaded + ".part"):
                            if os.path.exists(p_):
                                os.unlink(p_)
                        url = url_for(image, ("read",), via)
                        argv = [*command, "download", "--quiet", "--unix",
                                "never", "--cafile", pki.ca_file, url,
                                downloaded]
                    else:
                        url = url_for(target, ("read", "write"), via)
                        argv = [*command, "upload", "--quiet", "--unix",
                                "never", "--cafile", pki.ca_file, image, url]
                    proxy_pid = proxies[via].pid if via else None
                    up0 = cpu_seconds(upstream.pid)
                    px0 = cpu_seconds(proxy_pid) if proxy_pid else 0.0
                    wall, client = run_command(argv)
                    cases.setdefault((op, route), []).append((
                        wall, client,
                        (cpu_seconds(proxy_pid) - px0) if proxy_pid else 0.0,
                        cpu_seconds(upstream.pid) - up0))
        gib = size / GiB
        print("| op | route | GiB/s median [min-max] | client CPU s/GiB "
              "| proxy CPU s/GiB | upstream CPU s/GiB |")
        print("|---|---|---|---|---|---|")
        for (op, route), runs in cases.items():
            speeds = [gib / r[0] for r in runs]
            med = [statistics.median(r[i] for r in runs) / gib
                   for i in (1, 2, 3)]
            print(f"| {op} | {route} | {statistics.median(speeds):.2f} "
                  f"[{min(speeds):.2f}-{max(speeds):.2f}] | {med[0]:.2f} | "
                  f"{med[1]:.2f} | {med[2]:.2f} |")
    finally:
        for srv in daemons:
            srv.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)


if __name__ == "__main__":
    main()
