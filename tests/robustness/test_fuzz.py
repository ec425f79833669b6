"""A bounded fuzzer of the daemon's HTTP services, in the spirit of h11's.

Each case is one connection to a real daemon over TLS, the local UNIX
socket or the control socket: a well-formed request from a small set,
mutated at random (bytes flipped, inserted, deleted; numbers made huge;
methods replaced; control characters in paths; heads cut short; a second
request pipelined), sent whole, then the sending side is shut, so that a
server waiting for more sees the end at once. The invariants:

- no 5xx status, but 501 for a method no resource knows;
- no hang: every connection ends within CASE_TIMEOUT;
- write safety: an image without a ticket, an image with a read-only
  ticket and the part of a writable image past its ticket's size are
  unchanged;
- the daemon lives, logs no traceback, and its descriptors and threads
  come back to their count before the run.

``DISKFERRY_FUZZ_CASES`` sets the number of cases (default 2000 for each
transport, 6000 in all), ``DISKFERRY_FUZZ_SEED`` the seed; a
failure reports the seed and the case so that it can be replayed:

    DISKFERRY_FUZZ_CASES=50000 .venv/bin/python -m pytest \\
        tests/robustness/test_fuzz.py -q
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import ssl
import time
import uuid

import pytest

import servers
from servers import make_sparse_file, ticket_dict

CASES = int(os.environ.get("DISKFERRY_FUZZ_CASES", "2000"))
SEED = int(os.environ.get("DISKFERRY_FUZZ_SEED", "20261201"))

#: Seconds a case may take from its first byte sent to the server's close.
CASE_TIMEOUT = 10.0

SIZE = 256 * 1024
FILE_SIZE = 2 * SIZE  # the writable image's file is larger than its ticket

STATUS = re.compile(rb"(?:\A|\r\n)HTTP/1\.[01] (\d{3}) ")


def pattern(size, seed):
    rng = random.Random(seed)
    return rng.randbytes(size)


@pytest.fixture(scope="module")
def target(tmp_path_factory, pki):
    workdir = tmp_path_factory.mktemp("fuzz")
    srv = servers.start_server("diskferry", workdir, local_socket="path", pki=pki)
    images = workdir / "images"
    images.mkdir()
    files = {
        "untouched": make_sparse_file(images / "untouched.raw", SIZE,
                                      {0: pattern(SIZE, 1)}),
        "readonly": make_sparse_file(images / "readonly.raw", SIZE,
                                     {0: pattern(SIZE, 2)}),
        "writable": make_sparse_file(images / "writable.raw", FILE_SIZE,
                                     {0: pattern(FILE_SIZE, 3)}),
    }
    tickets = {
        "readonly": ticket_dict(files["readonly"], SIZE, ops=["read"]),
        "writable": ticket_dict(files["writable"], SIZE),
    }
    yield srv, files, tickets
    srv.stop()


def install(srv, tickets):
    for t in tickets.values():
        srv.add_ticket(t)


# --- requests ----------------------------------------------------------------


def request(method, path, headers=(), body=b""):
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body or method in ("PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def number(rng):
    return rng.choice([0, 1, 511, 4096, SIZE - 1, SIZE, SIZE + 1, 2**63,
                       rng.randrange(SIZE)])


def image_request(rng, tickets):
    ro, rw = tickets["readonly"]["uuid"], tickets["writable"]["uuid"]
    tid = rng.choice([ro, rw, "*", str(uuid.uuid4())])
    a, b = number(rng), number(rng)
    kind = rng.randrange(9)
    if kind == 0:
        return request("OPTIONS", f"/images/{tid}")
    if kind == 1:
        return request("GET", f"/images/{ro}", [("Range", f"bytes={a}-{b}")])
    if kind == 2:
        return request("GET", f"/images/{tid}/extents?start={a}&length={b}")
    if kind == 3:
        return request("GET", f"/images/{ro}/checksum?block_size={a}")
    if kind == 4:
        body = rng.randbytes(rng.randrange(64))
        return request("PUT", f"/images/{rng.choice([rw, ro])}?flush=n",
                       [("Content-Range", f"bytes {a}-{a + len(body)}/*")], body)
    if kind == 5:
        op = rng.choice([{"op": "zero", "offset": a, "size": b},
                         {"op": "flush"}, {"op": "zero", "size": b}, []])
        return request("PATCH", f"/images/{rng.choice([rw, ro])}",
                       [("Content-Type", "application/json")],
                       json.dumps(op).encode())
    if kind == 6:
        return request("GET", "/info/")
    if kind == 7:
        return request("PUT", f"/images/{rw}", [("Expect", "100-continue")],
                       b"x" * rng.randrange(1, 32))
    return request("GET", f"/images/{ro}", [("Range", f"bytes={a}-")])


def control_request(rng, scratch):
    tid = str(uuid.uuid4())
    kind = rng.randrange(4)
    if kind == 0:
        t = ticket_dict(scratch, number(rng), rng.choice([["read"], ["write"]]))
        t["uuid"] = tid
        for name in rng.sample(["timeout", "inactivity_timeout", "size", "ops"],
                               rng.randrange(3)):
            t[name] = rng.choice([-1, 0, 10**20, "x", None, [], {"a": 1}])
        return request("PUT", f"/tickets/{tid}", body=json.dumps(t).encode())
    if kind == 1:
        return request("PATCH", f"/tickets/{tid}",
                       body=json.dumps({"timeout": number(rng)}).encode())
    if kind == 2:
        return request("GET", f"/tickets/{tid}")
    return request("DELETE", f"/tickets/{tid}")


# --- mutations ---------------------------------------------------------------

NOISE = [b"\r\n", b"\n", b"\r", b"\x00", b":", b" ", b"\x7f", b"\xff", b"%0a",
         b"%00", b"\r\n\r\n", b",", b"-", b"/", b"\t", b"\x1b[31m"]


def mutate(rng, data, extra):
    for _ in range(rng.randrange(1, 4)):
        kind = rng.randrange(9)
        pos = rng.randrange(len(data) + 1)
        if kind == 0 and data:
            i = rng.randrange(len(data))
            data = data[:i] + bytes([rng.randrange(256)]) + data[i + 1:]
        elif kind == 1:
            data = data[:pos] + rng.choice(NOISE) + data[pos:]
        elif kind == 2:
            data = data[:pos] + data[pos + rng.randrange(1, 16):]
        elif kind == 3:
            digits = rng.choice([20, 21, 400, 4301, 5000])
            data = re.sub(rb"\d+", b"9" * digits, data, count=rng.randrange(1, 3))
        elif kind == 4:
            method = rng.choice([b"STORE", b"CONFIG", b"TRACE", b"CONNECT",
                                 b"get", b"G\x00T", b"", b"X" * 30, b"DELETE",
                                 b"HEAD", b"POST"])
            data = re.sub(rb"\A[A-Z]+", method, data)
        elif kind == 5:
            data = data.replace(b" HTTP/1.1", rng.choice(NOISE) + b"x HTTP/1.1", 1)
        elif kind == 6:
            data = data[:pos]
        elif kind == 7:
            line = rng.choice([b"Content-Length: 3", b"Transfer-Encoding: chunked",
                               b"Connection: close", b"Content-Length: -1",
                               b"Range: bytes=0-1,2-3", b"X: " + b"a" * 9000])
            data = data.replace(b"\r\n", b"\r\n" + line + b"\r\n", 1)
        else:
            data = data + extra
    return data


# --- running -----------------------------------------------------------------


def connect(srv, transport):
    if transport == "tls":
        return srv.raw_remote_socket(timeout=CASE_TIMEOUT)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CASE_TIMEOUT)
    s.connect(srv.local_socket if transport == "unix" else srv.control_socket)
    return s


def run_case(srv, transport, data):
    """Send ``data``, shut the sending side, read to the end.

    Returns (bytes answered, True if the server ended the connection in
    time)."""
    sock = connect(srv, transport)
    got = bytearray()
    deadline = time.monotonic() + CASE_TIMEOUT
    try:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            pass
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return bytes(got), False
            except (ConnectionResetError, ssl.SSLError, OSError):
                return bytes(got), True
            if not chunk:
                return bytes(got), True
            got += chunk
        return bytes(got), False
    finally:
        sock.close()


def bad_statuses(answer):
    """Statuses of ``answer`` that break the invariants."""
    bad = []
    for m in STATUS.finditer(answer):
        status = int(m[1])
        if status >= 500 and not (
                status == 501 and b"is not implemented" in answer):
            bad.append(status)
    return bad


def count(pid, what):
    return len(os.listdir(f"/proc/{pid}/{what}"))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def settle(pid, fds, threads, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        now = count(pid, "fd"), count(pid, "task")
        if (now[0] <= fds and now[1] <= threads) or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def test_fuzz(target, tmp_path):
    srv, files, tickets = target
    install(srv, tickets)
    before = {name: path.read_bytes() for name, path in files.items()}
    scratch = make_sparse_file(tmp_path / "scratch.raw", SIZE)
    rng = random.Random(SEED)
    # Warm up (lazy imports, first connections), then take the baseline.
    for transport in ("tls", "unix", "control"):
        run_case(srv, transport, request("GET", "/info/"))
    fds, threads = count(srv.pid, "fd"), count(srv.pid, "task")
    rss = [rss_kib(srv.pid)]

    failures = []
    hangs = 0
    statuses: dict[int, int] = {}
    transports = ("tls", "unix", "control")
    for i in range(CASES * len(transports)):
        if i % 50 == 0:
            install(srv, tickets)  # a mutated request may have replaced one
        transport = transports[i % len(transports)]
        make = (lambda r: control_request(r, scratch)) if transport == "control" \
            else (lambda r: image_request(r, tickets))
        data = make(rng)
        if rng.random() < 0.9:
            data = mutate(rng, data, make(rng))
        answer, ended = run_case(srv, transport, data)
        for m in STATUS.finditer(answer):
            statuses[int(m[1])] = statuses.get(int(m[1]), 0) + 1
        if not ended:
            hangs += 1
            failures.append((i, transport, data[:300], "hang"))
        bad = bad_statuses(answer)
        if bad:
            failures.append((i, transport, data[:300], answer[:300]))
        assert len(failures) < 20, (SEED, failures)
        if i % 5000 == 4999:
            rss.append(rss_kib(srv.pid))

    assert srv.alive()
    assert not failures, (SEED, failures)
    assert hangs == 0
    log = srv.log_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 500:][:4000]

    # Write safety: only the writable image's ticket range may change.
    after = {name: path.read_bytes() for name, path in files.items()}
    assert after["untouched"] == before["untouched"]
    assert after["readonly"] == before["readonly"]
    assert len(after["writable"]) == FILE_SIZE
    assert after["writable"][SIZE:] == before["writable"][SIZE:]

    now = settle(srv.pid, fds, threads)
    assert now[0] <= fds and now[1] <= threads, (now, (fds, threads))
    # Most cases are malformed: 4xx answers dominate, and some succeed.
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) > CASES
    assert any(200 <= s < 300 for s in statuses)
    print(f"\nfuzz seed {SEED}: {CASES * len(transports)} cases, statuses "
          f"{dict(sorted(statuses.items()))}, fds {fds}->{now[0]}, threads "
          f"{threads}->{now[1]}, RSS KiB every 5000 cases {rss + [rss_kib(srv.pid)]}")
