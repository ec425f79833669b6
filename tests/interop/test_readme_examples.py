"""The README's "Try it" commands work as written, beside any other daemon.

The daemon runs as the README starts it: no configuration, so on the
default port 54322, the default abstract socket and the default folders.
So that this neither needs those free nor disturbs a daemon a user runs
on them (`scripts/serve`, then `scripts/test`, the README's order), the
daemon and the commands run in private network and mount namespaces
(``unshare``): a loopback interface of their own (port 54322, abstract
socket names are per network namespace) and scratch folders mounted over
/var/lib and /run (the default state and run folders for root, which
the daemon is in the namespace).

The scratch directory holds a `.venv` link to the project's venv, so the
relative paths of the README (`.venv/bin/diskferry`) resolve as in a
checkout. The only change to the commands is the image paths under
/var/tmp, moved into the scratch directory. The blocks run in one shell,
in order, as a user types them; curl runs with --fail-with-body so that
an HTTP error fails the example.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV = Path(sys.executable).parent.parent


def try_it_blocks() -> list[str]:
    text = README.read_text()
    start = text.index("## Try it")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```sh\n(.*?)```", text[start:end], re.S)


#: Runs inside the namespaces: loopback up, scratch /var/lib and /run,
#: the daemon in the background until the README's commands are done.
PRELUDE = """\
set -euo pipefail
ip link set lo up
mkdir -p "$SCRATCH/var-lib" "$SCRATCH/run"
mount --bind "$SCRATCH/var-lib" /var/lib
mount --bind "$SCRATCH/run" /run
cd "$SCRATCH"
.venv/bin/diskferry serve > serve.log 2>&1 &
daemon=$!
trap 'kill $daemon; wait $daemon || true' EXIT
for _ in $(seq 300); do
  grep -q "control socket:" serve.log && break
  kill -0 $daemon || { cat serve.log >&2; exit 1; }
  sleep 0.1
done
grep -q "control socket:" serve.log || { cat serve.log >&2; exit 1; }
curl() { command curl --silent --show-error --fail-with-body "$@"; }
"""


def namespaces() -> list[str]:
    """unshare arguments: a user namespace too when not root."""
    args = ["unshare", "--net", "--mount"]
    if os.geteuid() != 0:
        args.insert(1, "--map-root-user")
    return args


def test_readme_try_it(tmp_path):
    (tmp_path / ".venv").symlink_to(VENV)
    blocks = try_it_blocks()
    assert len(blocks) >= 3, blocks
    commands = "\n".join(b.replace("/var/tmp/", f"{tmp_path}/") for b in blocks)
    run = subprocess.run(
        [*namespaces(), "bash", "-c", PRELUDE + commands],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, SCRATCH=str(tmp_path),
                 PATH=f"{VENV}/bin:{os.environ['PATH']}"))
    log = (tmp_path / "serve.log").read_text() if (
        tmp_path / "serve.log").exists() else ""
    assert run.returncode == 0, (f"{commands}\nstdout: {run.stdout}\n"
                                 f"stderr: {run.stderr}\nlog: {log}")
    # The README's daemon used root's default folders, in the scratch
    # directory mounted over them.
    assert (tmp_path / "var-lib/diskferry/pki/ca.pem").exists()
    assert "control socket: /run/diskferry/control.sock" in log
    # The PUT of "hello" came back with the ranged GET, from the raw file
    # and from the qcow2 through NBD.
    assert "hello" in run.stdout
    assert "hello, qcow2" in run.stdout
    assert '"checksum"' in run.stdout
    assert '"uuid": "demo"' in run.stdout  # ticket list
    copy = tmp_path / "copy.raw"
    assert "copy.raw" in commands
    assert copy.stat().st_size == (tmp_path / "disk.raw").stat().st_size
    with open(copy, "rb") as f:
        # Zeroed by the PATCH example after "hello" was written.
        assert f.read(4096) == bytes(4096)
