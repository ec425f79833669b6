"""The README's "Try it" commands work as written, beside any other daemon.

The daemon runs as the README starts it: no configuration, so on the
default port 54322, the default abstract socket and the default folders.
So that this neither needs those free nor disturbs a daemon a user runs
on them (`scripts/serve`, then `scripts/test`, the README's order), the
daemon and the commands run in private network and mount namespaces
(``unshare``): a loopback interface of their own (port 54322, abstract
socket names are per network namespace) and scratch folders mounted over
/var/lib and /run (the default state and run folders for root, which
the daemon is in the namespace). Where namespaces are not allowed
(a container without CAP_SYS_ADMIN) the daemon gets a port, a local
socket and a state folder of this test, replaced in the commands too.

The scratch directory holds a `.venv` link to the project's venv, so the
relative paths of the README (`.venv/bin/diskferry`) resolve as in a
checkout. The only change to the commands is the image paths under
/var/tmp, moved into the scratch directory. The blocks run in one shell,
in order, as a user types them; curl runs with --fail-with-body so that
an HTTP error fails the example.
"""

from __future__ import annotations

import re
from pathlib import Path

from docrun import VENV, readme_run, sh_blocks

README = Path(__file__).resolve().parents[2] / "README.md"


def try_it_blocks() -> list[str]:
    return sh_blocks(README, "## Try it")


def test_readme_try_it(tmp_path):
    (tmp_path / ".venv").symlink_to(VENV)
    blocks = try_it_blocks()
    assert len(blocks) >= 3, blocks
    commands = "\n".join(b.replace("/var/tmp/", f"{tmp_path}/") for b in blocks)
    run, state = readme_run(tmp_path, commands)
    log = (tmp_path / "serve.log").read_text() if (
        tmp_path / "serve.log").exists() else ""
    assert run.returncode == 0, (f"{commands}\nstdout: {run.stdout}\n"
                                 f"stderr: {run.stderr}\nlog: {log}")
    # The README's daemon made its CA in its default state folder (in
    # the namespaces, root's, mounted from the scratch directory).
    assert (state / "pki" / "ca.pem").exists()
    # The PUT of "hello" came back with the ranged GET, from the raw file
    # and from the qcow2 through NBD.
    assert "hello" in run.stdout
    assert "hello, qcow2" in run.stdout
    assert '"checksum"' in run.stdout
    # ticket list: a row for "demo", its id shortened as in logs.
    assert re.search(rf"^d\.\.\. +file://{tmp_path}/disk\.raw +read,write ",
                     run.stdout, re.MULTILINE), run.stdout
    copy = tmp_path / "copy.raw"
    assert "copy.raw" in commands
    assert copy.stat().st_size == (tmp_path / "disk.raw").stat().st_size
    with open(copy, "rb") as f:
        # Zeroed by the PATCH example after "hello" was written.
        assert f.read(4096) == bytes(4096)
