"""The daemon out of file descriptors backs off and recovers.

The descriptor limit of a running daemon is lowered with prlimit(1); a
burst of connections then exhausts it, so accept() fails with EMFILE.
The daemon must neither spin nor die, and must serve again once the
burst is gone.
"""

import os
import resource
import shutil
import socket
import subprocess
import time

import pytest

import servers

BURST = 200


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")
def test_accept_backs_off_when_out_of_descriptors(tmp_path, pki):
    srv = servers.start_server("diskferry", tmp_path / "daemon", tls=False,
                               local_socket="path", pki=pki)
    try:
        limit = open_fds(srv.pid) + 20
        subprocess.run(["prlimit", f"--pid={srv.pid}",
                        f"--nofile={limit}:{limit}"], check=True)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert soft > BURST + 50, "the test itself needs descriptors"

        clients = []
        for _ in range(BURST):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(srv.local_socket)  # queued by the kernel if not accepted
            clients.append(s)
        time.sleep(1.0)
        assert srv.alive()
        cpu_before = _cpu_seconds(srv.pid)
        time.sleep(1.0)
        # Backing off, not spinning: well under a core while starved.
        assert _cpu_seconds(srv.pid) - cpu_before < 0.5
        for s in clients:
            s.close()

        deadline = time.monotonic() + 15
        while True:
            try:
                status, _, _ = srv.control("GET", "/tickets/none", timeout=5)
                con = srv.local_connection(timeout=5)
                con.request("OPTIONS", "/images/*")
                ok = con.getresponse().status == 200
                con.close()
                if status == 404 and ok:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, srv.log_text()[-3000:]
            time.sleep(0.2)
        log = srv.log_text()
        # Once per episode, not ten times a second of it.
        assert 1 <= log.count("backing off") <= 5
        assert "accepting again" in log
        assert "Traceback" not in log
    finally:
        srv.stop()


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
