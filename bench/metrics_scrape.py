"""Does scraping /metrics slow transfers? An A/B of whole transfers.

One daemon (``LocalDaemon``: TLS on a free port, a pathname local
socket) serves every run. The client is the ``diskferry`` command, run
as a whole process, downloading and uploading a fully allocated image
over the UNIX socket and over TLS. Each case runs twice per round, in
turn: without a scraper, and with a thread that GETs ``/metrics`` on the
control socket every 100 ms (a scrape interval a hundred times shorter
than Prometheus's usual 15 s), new connection each time. Cases are
interleaved, ``--reps`` rounds.

Printed: GiB/s (median, [min-max]) and the daemon's CPU seconds per GiB
for each case with and without the scraper, and the scrapes made with
their median and worst latency.

    .venv/bin/python bench/metrics_scrape.py [--size 1G] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

from diskferry.benchmark import limits
from diskferry.benchmark.localdaemon import LocalDaemon, _ControlConnection
from diskferry.benchmark.runner import OPS, TRANSPORTS, make_image, write_zeros
from diskferry.cli.units import parse_size

GiB = 1024**3

#: Seconds between scrapes.
INTERVAL = 0.1


class Scraper:
    """GET /metrics every ``INTERVAL`` until stopped; keeps latencies."""

    def __init__(self, control: str) -> None:
        self.control = control
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):
            start = time.monotonic()
            con = _ControlConnection(self.control)
            try:
                con.request("GET", "/metrics")
                res = con.getresponse()
                res.read()
                if res.status != 200:
                    raise RuntimeError(f"/metrics: {res.status}")
            finally:
                con.close()
            self.latencies.append(time.monotonic() - start)


def run_case(daemon: LocalDaemon, op: str, unix: str, image: str,
             target: str, downloaded: str, size: int) -> tuple[float, float]:
    """Seconds and daemon CPU seconds of one transfer."""
    # download: the image's ticket to a new file; upload: the image to a
    # ticket on a target written beforehand.
    ops = ("read",) if op == "download" else ("read", "write")
    url = daemon.url(image if op == "download" else target, size, ops)
    source, destination = ((url, downloaded) if op == "download"
                           else (image, url))
    argv = [sys.executable, "-m", "diskferry", op, "--quiet", "--unix", unix,
            "--cafile", daemon.ca_file, source, destination]
    limits.page_cache_read(image)
    before = daemon.cpu()
    measure = limits.run_command(argv)
    cpu = daemon.cpu() - before
    if os.path.exists(downloaded):
        os.unlink(downloaded)
    return measure.seconds, cpu


def measure(size: int, reps: int, work: str) -> tuple[dict, list[float]]:
    image = os.path.join(work, "image.raw")
    target = os.path.join(work, "upload.raw")
    downloaded = os.path.join(work, "download.raw")
    make_image(image, size)
    write_zeros(target, size)
    runs: dict[tuple[str, str, bool], list[tuple[float, float]]] = {}
    latencies: list[float] = []
    with LocalDaemon() as daemon:
        for rep in range(reps):
            print(f"round {rep + 1} of {reps}", file=sys.stderr)
            for op in OPS:
                for transport, unix in TRANSPORTS:
                    for scraping in (False, True):
                        key = (op, transport, scraping)
                        args = (daemon, op, unix, image, target, downloaded,
                                size)
                        if scraping:
                            with Scraper(daemon.control) as scraper:
                                result = run_case(*args)
                            latencies += scraper.latencies
                        else:
                            result = run_case(*args)
                        runs.setdefault(key, []).append(result)
    return runs, latencies


def report(runs: dict, latencies: list[float], size: int) -> None:
    gib = size / GiB
    print("| case | scraper | GiB/s median [min-max] | daemon CPU s/GiB |")
    print("|---|---|---|---|")
    for (op, transport, scraping), results in runs.items():
        rates = [gib / seconds for seconds, _ in results]
        cpu = statistics.median(c for _, c in results) / gib
        print(f"| {op} {transport} | {'every 100 ms' if scraping else 'none'}"
              f" | {statistics.median(rates):.2f} [{min(rates):.2f}-"
              f"{max(rates):.2f}] | {cpu:.3f} |")
    if latencies:
        print(f"\n{len(latencies)} scrapes, latency median "
              f"{statistics.median(latencies) * 1000:.1f} ms, worst "
              f"{max(latencies) * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=GiB)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="diskferry-metrics-bench-",
                            dir="/dev/shm" if os.path.isdir("/dev/shm")
                            else None)
    try:
        runs, latencies = measure(args.size, args.reps, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(runs, latencies, args.size)


if __name__ == "__main__":
    main()
