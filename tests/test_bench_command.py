"""``diskferry bench`` runs on its own (its own daemon, image and
scratch folders) and reports every row, then leaves nothing behind."""

import json
import os
import subprocess
import sys

NAMES = ["download unix", "download tls", "upload unix", "upload tls",
         "page-cache read", "sendfile>unix", "TLS in memory",
         "qemu-img convert"]


def test_bench_reports_transfers_and_limits(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "diskferry", "bench", "--size", "16M",
         "--reps", "2", "--dir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["size"] == 16 * 1024**2
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == NAMES
    for row in rows.values():
        assert row["runs"] == 2
        assert 0 < row["gib_s_min"] <= row["gib_s"] <= row["gib_s_max"]
        assert row["client_cpu_s_per_gib"] >= 0
    for name in NAMES[:4]:
        assert rows[name]["kind"] == "transfer"
        assert rows[name]["server_cpu_s_per_gib"] >= 0
    # CPU time comes in clock ticks: a small transfer may take none, but
    # the daemon served eight.
    assert sum(rows[name]["server_cpu_s_per_gib"] for name in NAMES[:4]) > 0
    assert os.listdir(tmp_path) == []


def test_bench_refuses_bad_arguments():
    for args, message in ((["--size", "1k"], "out of range: between 1"),
                          (["--reps", "0"], "out of range: between 1 and 20")):
        proc = subprocess.run([sys.executable, "-m", "diskferry", "bench",
                               *args], capture_output=True, text=True)
        assert proc.returncode == 2
        assert message in proc.stderr
