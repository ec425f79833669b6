"""A diskferry daemon started for a benchmark, and stopped after it.

It runs ``python -m diskferry serve`` on a configuration of its own (a
free TCP port with TLS, a pathname local socket, a scratch state folder
where its certificates are made), so that it never meets a daemon the
user runs. Readiness is the daemon's ``READY=1`` on a private
``NOTIFY_SOCKET``, as under systemd: no polling.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from types import TracebackType

#: Seconds the daemon may take to start (it makes a CA on first start).
START_TIMEOUT = 60.0

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system time of a process and its reaped children."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / TICK


class _ControlConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class LocalDaemon:
    """A daemon in a scratch folder; ``url(path, size)`` makes a ticket."""

    def __init__(self, extra_config: str = "") -> None:
        self.folder = tempfile.mkdtemp(prefix="diskferry-bench-")
        with socket.socket() as s:
            s.bind(("localhost", 0))
            self.port: int = s.getsockname()[1]
        self.control = os.path.join(self.folder, "control.sock")
        self.ca_file = os.path.join(self.folder, "pki", "ca.pem")
        config = os.path.join(self.folder, "diskferry.toml")
        with open(config, "w") as f:
            f.write(f'[daemon]\nstate_dir = "{self.folder}"\n'
                    f'run_dir = "{self.folder}"\n'
                    f'[remote]\nhost = "localhost"\nport = {self.port}\n'
                    f'[local]\nsocket = "{self.folder}/local.sock"\n'
                    f'[control]\nsocket = "{self.control}"\n'
                    + extra_config)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = os.path.join(self.folder, "notify.sock")
        notify.bind(notify_path)
        notify.settimeout(START_TIMEOUT)
        self._log = open(os.path.join(self.folder, "serve.log"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "diskferry", "serve", "--config", config],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            env=dict(os.environ, NOTIFY_SOCKET=notify_path))
        try:
            with notify:
                while b"READY=1" not in notify.recv(4096):
                    pass
        except BaseException:
            self.close()
            raise

    def log_text(self) -> str:
        with open(os.path.join(self.folder, "serve.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def url(self, path: str, size: int, ops: tuple[str, ...], *,
            sparse: bool = False, **fields: object) -> str:
        """A new ticket on ``path``; its TLS transfer URL. A ``sparse``
        ticket zeroes by punching holes, as for a thin volume; ``fields``
        are more ticket fields (``format``, or a ``url`` instead of
        ``path``'s)."""
        ticket_id = str(uuid.uuid4())
        body = json.dumps({"uuid": ticket_id, "size": size, "ops": list(ops),
                           "url": f"file://{os.path.abspath(path)}",
                           "sparse": sparse, "timeout": 3600, **fields})
        con = _ControlConnection(self.control)
        try:
            con.request("PUT", f"/tickets/{ticket_id}", body=body,
                        headers={"Content-Type": "application/json"})
            res = con.getresponse()
            answer = res.read()
        finally:
            con.close()
        if res.status != 200:
            raise RuntimeError(f"adding a ticket: {res.status} {answer!r}")
        return f"https://localhost:{self.port}/images/{ticket_id}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LocalDaemon:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
