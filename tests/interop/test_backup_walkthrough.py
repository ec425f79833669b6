"""docs/client.md's "Backup and restore" walk-through works as written.

Run like the README's "Try it" (``docrun``): the daemon as the README
starts it, in namespaces of its own where the machine allows them, the
commands in one shell, in order, with only the image folder (/var/tmp/)
moved into the scratch directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from docrun import VENV, readme_run, sh_blocks

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "client.md"


def test_backup_walkthrough(tmp_path):
    (tmp_path / ".venv").symlink_to(VENV)
    blocks = sh_blocks(GUIDE, "## Backup and restore")
    assert len(blocks) == 4, blocks
    commands = "\n".join(b.replace("/var/tmp/", f"{tmp_path}/")
                         for b in blocks)
    try:
        run, _ = readme_run(tmp_path, commands)
    finally:
        _kill_leftover_qemu_nbd(tmp_path / "backup" / "nbd.pid")
    log = (tmp_path / "serve.log").read_text() if (
        tmp_path / "serve.log").exists() else ""
    assert run.returncode == 0, (f"stdout: {run.stdout}\nstderr: "
                                 f"{run.stderr}\nlog: {log}")
    # Each incremental, and the restored disk, read as the disk did.
    assert run.stdout.count("Images are identical.") == 3, run.stdout
    backup = tmp_path / "backup"
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(backup / "inc2.qcow2")],
        capture_output=True, text=True, check=True).stdout
    assert '"backing-filename": "inc1.qcow2"' in info
    # Incrementals hold what changed, not the disk.
    assert os.stat(backup / "inc1.qcow2").st_size < 8 * 1024**2


def _kill_leftover_qemu_nbd(pid_file: Path) -> None:
    """A qemu-nbd a failed command left running (qemu-nbd leaves its pid
    file behind: check the pid is still one)."""
    try:
        pid = int(pid_file.read_text())
        if Path(f"/proc/{pid}/comm").read_text().strip() == "qemu-nbd":
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass
