"""The README's "Try it" commands work as written.

The daemon runs on its embedded default configuration (no --config) in a
scratch directory that holds a `.venv` link to the project's venv, so the
relative paths of the README (`.venv/bin/diskferry`, `.diskferry/pki/ca.pem`)
resolve as they do for a user in a checkout.  The only change to the
commands is the image paths under /var/tmp, moved into the scratch
directory.  curl is run with --fail-with-body so that an HTTP error fails
the example.
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
README = ROOT / "README.md"
VENV = Path(sys.executable).parent.parent
DEFAULT_PORT = 54322


def try_it_blocks() -> list[str]:
    text = README.read_text()
    start = text.index("## Try it")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```sh\n(.*?)```", text[start:end], re.S)


@pytest.fixture
def default_daemon(tmp_path):
    (tmp_path / ".venv").symlink_to(VENV)
    with socket.socket() as s:
        try:
            s.bind(("localhost", DEFAULT_PORT))
        except OSError as e:
            pytest.fail(f"port {DEFAULT_PORT} of the README is taken: {e}")
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [str(tmp_path / ".venv/bin/diskferry"), "serve"],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 30
    try:
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                socket.create_connection(("localhost", DEFAULT_PORT), 1).close()
                if (tmp_path / ".diskferry/pki/ca.pem").exists():
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.1)
        yield tmp_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_block(cwd: Path, block: str) -> str:
    block = block.replace("/var/tmp/", f"{cwd}/")
    script = (
        "set -euo pipefail\n"
        'curl() { command curl --silent --show-error --fail-with-body "$@"; }\n'
        + block
    )
    r = subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PATH=f"{VENV}/bin:{os.environ['PATH']}"),
    )
    assert r.returncode == 0, f"{block}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def test_readme_try_it(default_daemon):
    cwd = default_daemon
    blocks = try_it_blocks()
    assert len(blocks) >= 3, blocks
    outputs = [run_block(cwd, b) for b in blocks]
    joined = "\n".join(outputs)
    # The PUT of "hello" came back with the ranged GET, from the raw file
    # and from the qcow2 through NBD.
    assert "hello" in joined
    assert "hello, qcow2" in joined
    assert '"checksum"' in joined
    copy = cwd / "copy.raw"
    if "copy.raw" in "".join(blocks):
        assert copy.stat().st_size == (cwd / "disk.raw").stat().st_size
        with open(copy, "rb") as f:
            # Zeroed by the PATCH example after "hello" was written.
            assert f.read(4096) == bytes(4096)
