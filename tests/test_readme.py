"""The README's quick start works as written.

Starts ``diskferry serve`` with no configuration, as the README does,
then runs the shell blocks of its "Try it" section with bash. ``curl``
is made to fail on HTTP errors, so a command that answers an error fails
the test instead of printing it.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PORT = 54322
FILES = ("/var/tmp/disk.raw", "/var/tmp/copy.raw")


def shell_blocks(section):
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {section}")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```sh\n(.*?)```", text[start:end], re.S)


def port_free(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def default_daemon(tmp_path):
    if not port_free(DEFAULT_PORT):
        pytest.fail(f"port {DEFAULT_PORT} is in use; the README daemon "
                    f"needs it")
    os.symlink(sys.prefix, tmp_path / ".venv")
    env = dict(os.environ)
    env.pop("DISKFERRY_STATE_DIR", None)
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "diskferry", "serve"],
                            cwd=tmp_path, env=env, stdout=log, stderr=log)
    sock = tmp_path / ".diskferry" / "run" / "control.sock"
    deadline = time.monotonic() + 20
    while not (sock.exists() and not port_free(DEFAULT_PORT)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail((tmp_path / "serve.log").read_text())
        time.sleep(0.05)
    yield tmp_path
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    log.close()
    assert not sock.exists(), "control socket left behind"
    for path in FILES:
        if os.path.exists(path):
            os.unlink(path)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_try_it_section(default_daemon):
    prelude = 'curl() { command curl --fail-with-body -sS "$@"; }\nset -ex\n'
    outputs = []
    for block in shell_blocks("Try it"):
        run = subprocess.run(["bash", "-c", prelude + block],
                             cwd=default_daemon, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr + run.stdout
        outputs.append(run.stdout)
    # The Range GET read back what the PUT wrote.
    assert "hello" in outputs[1]
    # The download is the image, zeroed first block included.
    assert Path(FILES[1]).stat().st_size == 1024**3
    with open(FILES[1], "rb") as f:
        assert f.read(4096) == b"\0" * 4096
