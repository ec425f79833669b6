"""docs/kvm-host.md's walk-through works as written: backups of a qcow2
disk through format tickets, with diskferry and with the
ovirt_imageio.client library, restored to the disk's data.

Run like the README's "Try it" (``docrun``), with only the image folder
(/var/tmp/) moved into the scratch directory.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from docrun import VENV, readme_run, sh_blocks

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "kvm-host.md"


def test_kvm_walkthrough(tmp_path):
    (tmp_path / ".venv").symlink_to(VENV)
    blocks = sh_blocks(GUIDE, "## Backup and restore")
    blocks += sh_blocks(GUIDE, "## The same with an existing backup client")
    assert len(blocks) == 4, blocks
    commands = "\n".join(b.replace("/var/tmp/", f"{tmp_path}/")
                         for b in blocks)
    run, _ = readme_run(tmp_path, commands)
    log = (tmp_path / "serve.log").read_text() if (
        tmp_path / "serve.log").exists() else ""
    assert run.returncode == 0, (f"stdout: {run.stdout}\nstderr: "
                                 f"{run.stderr}\nlog: {log}")
    assert "format:" in run.stdout and "qemu-nbd" in run.stdout
    # inc1, the restore, inc2 and the library's restore.
    assert run.stdout.count("Images are identical.") == 4, run.stdout
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(tmp_path / "kvm" / "inc2.qcow2")],
        capture_output=True, text=True, check=True).stdout
    assert '"backing-filename": "inc1.qcow2"' in info
    # No export outlives its ticket or the daemon.
    assert not list((tmp_path).rglob("export-*.sock"))
