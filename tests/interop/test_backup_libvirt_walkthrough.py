"""docs/kvm-host.md's "Backup of a running VM" walk-through works as
written.

Run like the README's "Try it" (``docrun``): the daemon as the README
starts it, the commands in one shell, in order, with the image folder
(/var/tmp/) moved into a folder of the test and the domain ``vm1`` a
guest of this test, which writes between the steps as the guide says
the guest does.

Not in namespaces (docrun's way where a machine allows none: the
daemon's port, local socket and state folder are the test's, in its
configuration and the commands alike): QEMU, outside any namespace,
makes the backup's socket at the path the daemon names in its run
folder, and the daemon and the commands reach libvirtd on its socket in
/run/libvirt, which the namespaces' own /run would hide.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from docrun import VENV, readme_run, sh_blocks

import libvirt_guest
from libvirt_guest import Guest, MiB, assert_same, public_folder

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "kvm-host.md"

#: One guest for the module.
guest = libvirt_guest.guest


def test_backup_walkthrough(guest):
    scratch = Path(public_folder("diskferry-walkthrough-"))
    try:
        (scratch / ".venv").symlink_to(VENV)
        script, points = _script(guest, scratch)
        run, _ = readme_run(scratch, script, isolated=False)
        log = (scratch / "serve.log").read_text() if (
            scratch / "serve.log").exists() else ""
        assert run.returncode == 0, (f"stdout: {run.stdout}\nstderr: "
                                     f"{run.stderr}\nlog: {log}")
        assert run.stdout.count("Images are identical.") == 1, run.stdout
        backups = scratch / guest.name
        for image, point in (("full", "full"), ("inc1", "inc1"),
                             ("inc2", "inc2"), ("inc2-imageio", "inc2"),
                             ("restored", "inc2")):
            assert_same(str(backups / f"{image}.qcow2"), points[point])
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", str(backups / "inc2.qcow2")],
            capture_output=True, text=True, check=True).stdout
        assert '"backing-filename": "inc1.qcow2"' in info
        assert guest.job_type() == "None"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _script(guest: Guest, scratch: Path) -> tuple[str, dict[str, str]]:
    """The guide's commands for ``guest`` with the guest's writes between
    them, and the guest's disk as each backup must read it."""
    blocks = [re.sub(r"\bvm1\b", guest.name, block).replace(
        "/var/tmp/", f"{scratch}/") for block in sh_blocks(
            GUIDE, "## Backup of a running VM")]
    assert len(blocks) == 5, blocks
    full, inc1, inc2, imageio, restore = blocks
    points: dict[str, str] = {}

    def point(name: str) -> str:
        command, points[name] = guest.snapshot_script(f"walk-{name}.raw")
        return command

    steps = [
        point("full"), full,
        guest.write_script(0x21, 1 * MiB, 64 * 1024),
        guest.write_script(0x22, 9 * MiB, 128 * 1024),
        point("inc1"), inc1,
        guest.write_script(0x23, 1 * MiB + 32 * 1024, 64 * 1024),
        point("inc2"), inc2,
        # During the job: the library reads the backup as it began.
        guest.write_script(0x24, 4 * MiB, 64 * 1024),
        imageio, restore,
    ]
    return "\n".join(steps), points
