"""Run documented shell commands as written, beside a daemon started
as the README starts it.

The daemon and the commands run in private network and mount namespaces
(``unshare``): a loopback interface of their own (port 54322; abstract
socket names are per network namespace) and scratch folders mounted over
/var/lib and /run (the default state and run folders for root, which
the daemon is in the namespace). Where namespaces are not allowed
(a container without CAP_SYS_ADMIN) the daemon gets a port, a local
socket and a state folder of the test, replaced in the commands too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import servers

VENV = Path(sys.executable).parent.parent


def sh_blocks(path: Path, heading: str) -> list[str]:
    """The ```sh blocks of the section ``heading`` of a Markdown file."""
    text = path.read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return re.findall(r"```sh\n(.*?)```", text[start:end if end > 0 else None],
                      re.S)


#: Loopback up, scratch /var/lib and /run: inside the namespaces.
NAMESPACE_SETUP = """\
ip link set lo up
mkdir -p "$SCRATCH/var-lib" "$SCRATCH/run"
mount --bind "$SCRATCH/var-lib" /var/lib
mount --bind "$SCRATCH/run" /run
"""

#: The daemon in the background until the README's commands are done.
PRELUDE = """\
set -euo pipefail
{setup}
cd "$SCRATCH"
.venv/bin/diskferry serve {serve_args} > serve.log 2>&1 &
daemon=$!
trap 'kill $daemon; wait $daemon || true' EXIT
for _ in $(seq 300); do
  grep -q "control socket:" serve.log && break
  kill -0 $daemon || {{ cat serve.log >&2; exit 1; }}
  sleep 0.1
done
grep -q "control socket:" serve.log || {{ cat serve.log >&2; exit 1; }}
curl() {{ command curl --silent --show-error --fail-with-body "$@"; }}
"""


def namespaces() -> list[str] | None:
    """unshare arguments (a user namespace too when not root), or None
    where this machine allows no namespaces (a container without
    CAP_SYS_ADMIN)."""
    args = ["unshare", "--net", "--mount"]
    if os.geteuid() != 0:
        args.insert(1, "--map-root-user")
    probe = subprocess.run([*args, "true"], capture_output=True)
    return args if probe.returncode == 0 else None


def readme_run(tmp_path: Path, commands: str, isolated: bool = True):
    """Run the daemon and ``commands``: in namespaces as written, else
    with the daemon's port, local socket and state folder replaced by
    ones of this test (in the daemon's configuration and the commands
    alike); never in namespaces if not ``isolated`` (commands that need
    the host's /run). Returns (completed process, the state folder used)."""
    env = dict(os.environ, SCRATCH=str(tmp_path),
               PATH=f"{VENV}/bin:{os.environ['PATH']}")
    prefix = namespaces() if isolated else None
    if prefix is not None:
        script = PRELUDE.format(setup=NAMESPACE_SETUP, serve_args="")
        state = tmp_path / "var-lib" / "diskferry"
    else:
        prefix = []
        state = tmp_path / "state"
        port = servers.free_port()
        name = f"/diskferry-readme/{uuid.uuid4().hex}"
        (tmp_path / "daemon.toml").write_text(
            f"[remote]\nport = {port}\n[local]\nsocket = \"@{name}\"\n")
        env["DISKFERRY_STATE_DIR"] = str(state)
        for old, new in (("54322", str(port)), ("/org/ovirt/imageio", name),
                         ("/var/lib/diskferry", str(state)),
                         ("${XDG_STATE_HOME:-~/.local/state}/diskferry",
                          str(state))):
            commands = commands.replace(old, new)
        script = PRELUDE.format(setup="", serve_args="--config daemon.toml")
    run = subprocess.run(
        [*prefix, "bash", "-c", script + commands],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    return run, state


