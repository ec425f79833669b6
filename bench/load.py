"""Small reads beside big writes, on diskferry and ovirt-imageio 2.5.1.

N connections over one transport (TLS or the UNIX socket), half sending
4 KiB ranged GETs at random offsets, half 4 MiB PUTs (``flush=n``) to
ranges of their own, spread over several tickets, for a fixed time; the
same shape against each daemon in one run. Per operation: requests/s,
MiB/s, p50/p99 latency and errors; per row the daemon's peak RSS and
threads while loaded, and both again a few seconds after the clients
closed (back to baseline?). What it is for: a small request must not be
queued behind other connections' large bodies (docs/design.md, fairness
under load); ovirt-imageio's latency is the bar.

Clients run in several processes (threads in each), GETs and PUTs in
processes of their own, so that the client side's own GIL (busy sending
4 MiB bodies) does not set the small GETs' latency. Every connection is
opened (TLS handshake included) before the clock starts: the latencies
are of requests, not of a storm of handshakes. Latencies are of the
requests answered as expected; the others count as errors. Daemons as
the test suite starts them (``tests/servers.py``); images are sparse
files in a temporary folder.

With ``--get-rate N`` each GET connection sends N requests a second
(an open loop: the same offered load on each daemon), so that the PUTs'
MiB/s and the GETs' latency can be compared at once; without it, each
GET follows the last answer, and a daemon that answers small GETs
sooner serves more of them, with CPU the PUTs then lack.

    .venv/bin/python bench/load.py [--seconds 30] [--connections 64 256]
        [--transports tls unix] [--servers diskferry ovirt-imageio]
        [--get-rate N]
        [--output bench/results/DATE-load.md]
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import random
import ssl
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import servers  # noqa: E402  (the suite's daemon launcher)

MiB = 1024**2
SMALL = 4096
PUT_SIZE = 4 * MiB
TICKETS = 16
PROCESSES = 4
#: Seconds the connections have to open (and shake hands) before the
#: clock starts; well under the daemons' pre-request timeouts (10 s for
#: diskferry), so that no connection is cut while it waits.
CONNECT_TIME = 3


@dataclass
class OpStats:
    """What one kind of request did in a run."""

    latencies: list[float] = field(default_factory=list)
    moved: int = 0
    errors: int = 0

    def merge(self, other: OpStats) -> None:
        self.latencies += other.latencies
        self.moved += other.moved
        self.errors += other.errors


@dataclass
class Job:
    """The connections one client process runs (picklable: addresses,
    not the daemon's process)."""

    address: tuple[str, int, str, str]  # host, port, CA file, UNIX socket
    transport: str
    tickets: list[tuple[str, int]]  # (ticket id, image size)
    connections: list[int]  # connection numbers; even: GET, odd: PUT
    seconds: float
    start: float  # wall-clock time the clock starts, the same for all
    get_rate: float  # GETs a second per GET connection; 0: back to back


def connect(job: Job) -> http.client.HTTPConnection:
    host, port, ca_file, local_socket = job.address
    if job.transport == "unix":
        return servers.UnixHTTPConnection(local_socket, timeout=60)
    context = ssl.create_default_context(cafile=ca_file)
    return http.client.HTTPSConnection(host, port, timeout=60,
                                       context=context)


def one_connection(job: Job, n: int, deadline: float,
                   stats: OpStats, data: bytes,
                   ready: threading.Event) -> None:
    """GETs (``n`` even) or PUTs (``n`` odd) until ``deadline``."""
    ticket, size = job.tickets[n % len(job.tickets)]
    rng = random.Random(n)
    paced = n % 2 == 0 and job.get_rate > 0
    con = connect(job)
    try:
        con.connect()
    except OSError:
        stats.errors += 1  # the request loop connects again
    ready.wait()
    due = time.monotonic() + rng.random() / job.get_rate if paced else 0.0
    try:
        while time.monotonic() < deadline:
            method, path, headers, body, want = next_request(
                n, ticket, size, rng, data)
            if paced:
                # A request is timed from when it was due: an answer that
                # comes late delays the next request, and that wait counts.
                time.sleep(max(0.0, due - time.monotonic()))
                start, due = due, due + 1 / job.get_rate
            else:
                start = time.monotonic()
            try:
                con.request(method, path, body=body, headers=headers)
                res = con.getresponse()
                got = res.read()
                ok = res.status == want
            except OSError:
                ok, got = False, b""
                con.close()
                con = connect(job)
            if ok:
                stats.latencies.append(time.monotonic() - start)
                stats.moved += len(got) if body is None else len(body)
            else:
                stats.errors += 1
    finally:
        con.close()


def next_request(n: int, ticket: str, size: int, rng: random.Random,
                 data: bytes) -> tuple[str, str, dict[str, str],
                                       bytes | None, int]:
    """Connection ``n``'s next request: method, path, headers, body and
    the status it wants."""
    if n % 2 == 0:
        offset = rng.randrange(size // SMALL) * SMALL
        return ("GET", f"/images/{ticket}",
                {"Range": f"bytes={offset}-{offset + SMALL - 1}"}, None, 206)
    slot = (n // 2 // TICKETS) % (size // PUT_SIZE)
    offset = slot * PUT_SIZE
    return ("PUT", f"/images/{ticket}?flush=n",
            {"Content-Range": f"bytes {offset}-{offset + PUT_SIZE - 1}/*"},
            data, 200)


def run_job(job: Job) -> tuple[OpStats, OpStats]:
    """One client process: its connections in threads; (GET, PUT) stats."""
    data = os.urandom(PUT_SIZE)
    start = job.start + time.monotonic() - time.time()
    deadline = start + job.seconds
    per = {n: OpStats() for n in job.connections}
    ready = threading.Event()
    threads = [threading.Thread(target=one_connection,
                                args=(job, n, deadline, per[n], data, ready))
               for n in job.connections]
    for t in threads:
        t.start()
    time.sleep(max(0.0, start - time.monotonic()))
    ready.set()
    for t in threads:
        t.join()
    gets, puts = OpStats(), OpStats()
    for n, stats in per.items():
        (gets if n % 2 == 0 else puts).merge(stats)
    return gets, puts


def proc_status(pid: int) -> tuple[float, int]:
    """RSS (MiB) and threads of a process."""
    rss, threads = 0.0, 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, threads


def sample_peak(pid: int, stop: threading.Event, peak: list[float]) -> None:
    while not stop.wait(0.2):
        try:
            rss, threads = proc_status(pid)
        except FileNotFoundError:
            return
        peak[0], peak[1] = max(peak[0], rss), max(peak[1], threads)


@dataclass
class Row:
    server: str
    transport: str
    connections: int
    seconds: float
    gets: OpStats
    puts: OpStats
    peak: list[float]
    after: tuple[float, int]


def run_row(server: servers.Server, kind: str, transport: str,
            connections: int, tickets: list[tuple[str, int]],
            seconds: float, get_rate: float = 0.0) -> Row:
    gets, puts = list(range(0, connections, 2)), list(range(1, connections, 2))
    half = PROCESSES // 2
    address = (server.host, server.port, server.ca_file or "",
               server.local_socket or "")
    start = time.time() + CONNECT_TIME
    jobs = [Job(address, transport, tickets, numbers[i::half], seconds,
                start, get_rate)
            for numbers in (gets, puts) for i in range(half)]
    stop, peak = threading.Event(), [0.0, 0.0]
    sampler = threading.Thread(target=sample_peak,
                               args=(server.pid, stop, peak))
    sampler.start()
    with multiprocessing.Pool(PROCESSES) as pool:
        results = pool.map(run_job, jobs, chunksize=1)
    stop.set()
    sampler.join()
    gets, puts = OpStats(), OpStats()
    for g, p in results:
        gets.merge(g)
        puts.merge(p)
    time.sleep(3)
    return Row(kind, transport, connections, seconds, gets, puts, peak,
               proc_status(server.pid))


def image_tickets(server: servers.Server, folder: str,
                  connections: int) -> list[tuple[str, int]]:
    """TICKETS sparse images, each with room for its PUT connections."""
    size = max(1, connections // 2 // TICKETS + 1) * PUT_SIZE * 2
    tickets = []
    for i in range(TICKETS):
        path = os.path.join(folder, f"{server.name}-{connections}-{i}.raw")
        with open(path, "wb") as f:
            f.truncate(size)
        t = servers.ticket_dict(path, size, ("read", "write"))
        server.add_ticket(t)
        tickets.append((t["uuid"], size))
    return tickets


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def table(rows: list[Row]) -> str:
    lines = [
        "| server | transport | conns | op | req/s | MiB/s | p50 ms | "
        "p99 ms | errors | peak RSS MiB | peak threads | after RSS MiB | "
        "after threads |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for op, s in (("GET 4 KiB", r.gets), ("PUT 4 MiB", r.puts)):
            lat = s.latencies
            lines.append(
                f"| {r.server} | {r.transport} | {r.connections} | {op} | "
                f"{len(lat) / r.seconds:.0f} | "
                f"{s.moved / MiB / r.seconds:.1f} | "
                f"{statistics.median(lat) * 1000 if lat else 0:.1f} | "
                f"{percentile(lat, 0.99) * 1000:.1f} | {s.errors} | "
                f"{r.peak[0]:.0f} | {r.peak[1]:.0f} | {r.after[0]:.0f} | "
                f"{r.after[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30,
                        help="length of each row (default 30)")
    parser.add_argument("--connections", type=int, nargs="+",
                        default=[64, 256], metavar="N",
                        help="connections of each row, half GETs and half "
                             "PUTs (default 64 256)")
    parser.add_argument("--transports", nargs="+", default=["tls", "unix"],
                        choices=["tls", "unix"],
                        help="default: both")
    parser.add_argument("--servers", nargs="+",
                        default=["diskferry", "ovirt-imageio"],
                        choices=["diskferry", "ovirt-imageio"],
                        help="default: both, in this order")
    parser.add_argument(
        "--get-rate", type=float, default=0.0, metavar="N",
        help="GETs a second on each GET connection, each timed from when "
             "it was due (default 0: each GET as soon as the last is "
             "answered, so a daemon that answers GETs faster also serves "
             "more of them, with CPU the PUTs then lack)")
    parser.add_argument("--output", metavar="FILE",
                        help="also write the report (markdown) here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="load-") as work:
        for kind in args.servers:
            with servers.start_server(kind, os.path.join(work, kind),
                                      local_socket="path") as server:
                for transport in args.transports:
                    for n in args.connections:
                        tickets = image_tickets(server, work, n)
                        rows.append(run_row(server, kind, transport, n,
                                            tickets, args.seconds,
                                            args.get_rate))
                        print(table(rows[-1:]), flush=True)
    report = (f"Command: `{' '.join(sys.argv)}`\n\n{table(rows)}\n")
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
