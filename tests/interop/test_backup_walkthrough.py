"""docs/client.md's "Backup and restore" walk-through works as written.

The daemon runs as `scripts/serve` runs it, from a scratch directory
that holds a `.venv` link to the project's venv (so `.venv/bin/diskferry`
and `.diskferry/pki/ca.pem` resolve as in a checkout), with only its
addresses moved: its own TCP port and local socket, so that a daemon the
user runs beside the tests is no obstacle. The commands change only by
the image folder (/var/tmp/ moved into the scratch directory) and the
port.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "client.md"
VENV = Path(sys.executable).parent.parent
DOCUMENTED_PORT = 54322


def walkthrough_blocks() -> list[str]:
    text = GUIDE.read_text()
    start = text.index("## Backup and restore")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```sh\n(.*?)```", text[start:end], re.S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def daemon(tmp_path):
    (tmp_path / ".venv").symlink_to(VENV)
    port = free_port()
    config = tmp_path / "diskferry.toml"
    config.write_text(f'[remote]\nport = {port}\n\n'
                      f'[local]\nsocket = "{tmp_path}/local.sock"\n')
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [str(tmp_path / ".venv/bin/diskferry"), "serve", "--config",
         str(config)],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    log.close()
    deadline = time.monotonic() + 30
    try:
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                socket.create_connection(("localhost", port), 1).close()
                if (tmp_path / ".diskferry/pki/ca.pem").exists():
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (
                tmp_path / "serve.log").read_text()
            time.sleep(0.1)
        yield tmp_path, port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # A qemu-nbd a failed block left running (qemu-nbd leaves its pid
        # file behind: check the pid is still one).
        pid_file = tmp_path / "backup" / "nbd.pid"
        try:
            pid = int(pid_file.read_text())
            if Path(f"/proc/{pid}/comm").read_text().strip() == "qemu-nbd":
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass


def run_block(cwd: Path, port: int, block: str) -> str:
    block = block.replace("/var/tmp/", f"{cwd}/").replace(
        f":{DOCUMENTED_PORT}/", f":{port}/")
    r = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + block], cwd=cwd,
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PATH=f"{VENV}/bin:{os.environ['PATH']}"))
    assert r.returncode == 0, f"{block}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def test_backup_walkthrough(daemon):
    cwd, port = daemon
    blocks = walkthrough_blocks()
    assert len(blocks) == 4, blocks
    outputs = [run_block(cwd, port, b) for b in blocks]
    # Each incremental, and the restored disk, read as the disk did.
    for out in outputs[1:]:
        assert "Images are identical." in out, out
    backup = cwd / "backup"
    assert ('"backing-filename": "inc1.qcow2"' in subprocess.run(
        ["qemu-img", "info", "--output=json", str(backup / "inc2.qcow2")],
        capture_output=True, text=True, check=True).stdout)
    # Incrementals hold what changed, not the disk.
    assert os.stat(backup / "inc1.qcow2").st_size < 8 * 1024**2
