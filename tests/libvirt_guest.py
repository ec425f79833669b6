"""A libvirt domain to back up, and the daemon and commands that back it
up: shared by the tests of libvirt backups.

The guest is a TCG domain with no operating system (it sits in
firmware); its qcow2 disk vda is written through the monitor (``qemu-io``
on the disk's virtio device), and every write is made as well on a raw
reference file, so that a backup is compared with ``qemu-img compare``
against the disk as it was when the backup began. Its raw disk vdb is
backed up in full only.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import servers

MiB = 1 << 20
SIZE = 16 * MiB
VIRSH = ["virsh", "-q", "-c", "qemu:///system"]
#: The disk's block device as QEMU's monitor names it under libvirt 9.
DEVICE = "/machine/peripheral/virtio-disk0/virtio-backend"


def libvirt_missing() -> str | None:
    """Why libvirt cannot run here, or None. CI has it: never a skip."""
    for cmd in ("virsh", "libvirtd", "virtlogd", "qemu-system-x86_64"):
        if shutil.which(cmd) is None:
            return f"{cmd} not installed (scripts/setup --test installs it)"
    if os.geteuid() != 0:
        return "qemu:///system needs root"
    return None


def ensure_libvirtd() -> None:
    """Start virtlogd and libvirtd when nothing runs them (no systemd)."""
    if subprocess.run([*VIRSH, "version"], capture_output=True).returncode:
        for daemon in ("virtlogd", "libvirtd"):
            if subprocess.run(["pgrep", "-x", daemon],
                              capture_output=True).returncode:
                subprocess.run([daemon, "-d"], check=True)
        deadline = time.monotonic() + 30
        while subprocess.run([*VIRSH, "version"],
                             capture_output=True).returncode:
            assert time.monotonic() < deadline, "libvirtd did not start"
            time.sleep(0.2)


def virsh(*args: str) -> str:
    return subprocess.run([*VIRSH, *args], check=True, capture_output=True,
                          text=True).stdout


def public_folder(prefix: str) -> str:
    """A folder under /tmp that QEMU's user may traverse (pytest's own
    are 0700)."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(path, 0o711)
    return path


DOMAIN_XML = """\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>{more}
  </devices>
</domain>
"""


RAW_DISK_XML = """
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vdb' bus='virtio'/>
    </disk>"""

#: The raw disk's size and content: libvirt backs it up in full only.
RAW_SIZE = 4 * MiB


class Guest:
    """The running domain, and the raw reference of its qcow2 disk vda;
    vdb is a raw disk."""

    def __init__(self, folder: str) -> None:
        self.name = f"diskferry-test-{uuid.uuid4().hex[:8]}"
        self.folder = folder
        self.disk = os.path.join(folder, "vda.qcow2")
        self.reference = os.path.join(folder, "reference.raw")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", self.disk,
                        str(SIZE)], check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw",
                        self.reference, str(SIZE)], check=True)
        for offset in (0, 5 * MiB):
            subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                            f"write -P 0x11 {offset} 512k", self.disk],
                           check=True, capture_output=True)
            self._reference_io(f"write -P 0x11 {offset} 512k")
        self.raw_disk = os.path.join(folder, "vdb.raw")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw",
                        self.raw_disk, str(RAW_SIZE)], check=True)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 1M 64k",
                        self.raw_disk], check=True, capture_output=True)
        xml = os.path.join(folder, "domain.xml")
        with open(xml, "w") as f:
            f.write(DOMAIN_XML.format(
                name=self.name, disk=self.disk,
                more=RAW_DISK_XML.format(disk=self.raw_disk)))
        virsh("create", xml)

    def write(self, pattern: int, offset: int, length: int) -> None:
        """A write of the running guest, and the same on the reference."""
        self._both(f"write -P {pattern:#x} {offset} {length}")

    def zero(self, offset: int, length: int) -> None:
        """The running guest writes zeroes, and the reference too."""
        self._both(f"write -z {offset} {length}")

    def snapshot(self, name: str) -> str:
        """A copy of the reference: the disk as it is now."""
        path = os.path.join(self.folder, name)
        shutil.copyfile(self.reference, path)
        return path

    def write_script(self, pattern: int, offset: int, length: int) -> str:
        """``write`` as shell commands, for a script to run between its
        steps (a failed write shows as a backup unlike its reference)."""
        command = f"write -P {pattern:#x} {offset} {length}"
        return "".join(shlex.join(argv) + " > /dev/null\n" for argv in (
            [*VIRSH, *self._monitor(command)], self._reference(command)))

    def snapshot_script(self, name: str) -> tuple[str, str]:
        """``snapshot`` as a shell command, and the copy it makes."""
        path = os.path.join(self.folder, name)
        return shlex.join(["cp", self.reference, path]) + "\n", path

    def job_type(self) -> str:
        for line in virsh("domjobinfo", self.name).splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Job type":
                return value.strip()
        return ""

    def abort_job(self) -> None:
        """End whatever job runs on the domain (a test that failed
        between a daemon's kill and its restart leaves one)."""
        subprocess.run([*VIRSH, "domjobabort", self.name],
                       capture_output=True)

    def destroy(self) -> None:
        subprocess.run([*VIRSH, "destroy", self.name], capture_output=True)

    def _both(self, command: str) -> None:
        """A ``qemu-io`` command on the running disk and the reference."""
        out = virsh(*self._monitor(command))
        assert "error" not in out.lower(), out
        self._reference_io(command)

    def _monitor(self, command: str) -> list[str]:
        """virsh's arguments that run ``command`` on the running disk."""
        return ["qemu-monitor-command", self.name, "--hmp",
                f'qemu-io -d {DEVICE} "{command}"']

    def _reference(self, command: str) -> list[str]:
        return ["qemu-io", "-f", "raw", "-c", command, self.reference]

    def _reference_io(self, command: str) -> None:
        subprocess.run(self._reference(command), check=True,
                       capture_output=True)


# Fixtures: a test module takes them as its own (``guest =
# libvirt_guest.guest``), each module then has a guest and a daemon.


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    """A running guest for the module; a skip where libvirt cannot run
    (a failure in CI)."""
    reason = libvirt_missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"libvirt must run in CI: {reason}")
        pytest.skip(reason)
    ensure_libvirtd()
    folder = public_folder("diskferry-guest-")
    g = Guest(folder)
    yield g
    g.destroy()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(guest: Guest) -> Iterator[servers.Server]:
    """A daemon whose run folder QEMU's user can reach."""
    workdir = public_folder("diskferry-backupd-")
    srv = servers.start_server("diskferry", workdir, local_socket="path")
    yield srv
    srv.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_job_left(guest: Guest, daemon: servers.Server) -> Iterator[None]:
    """Each test ends its jobs; a failed one leaves none to the next."""
    yield
    daemon.control("DELETE", f"/backups/{guest.name}")


def cli(daemon, *args: str, check: bool = True, cwd=None):
    done = subprocess.run(
        [sys.executable, "-m", "diskferry", *args], capture_output=True,
        text=True, timeout=120, cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if check:
        assert done.returncode == 0, done.stderr
    return done


def backup(daemon, guest, *args: str) -> dict:
    done = cli(daemon, "backup", "start", guest.name, "--json",
               "--socket", daemon.control_socket, *args)
    return json.loads(done.stdout)


def download(daemon, url: str, dest: str, unix: str, *args: str) -> str:
    """``diskferry download``; its summary ("... via unix ...")."""
    return cli(daemon, "download", url, dest, "--cafile", daemon.ca_file,
               "--unix", unix, *args, cwd=os.path.dirname(dest)).stdout


def assert_same(image: str, reference: str) -> None:
    done = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                           image, reference], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def backups_folder(daemon) -> str:
    return os.path.join(daemon.workdir, ".diskferry", "run", "backups")


def assert_ended(daemon, guest) -> None:
    """No job on the domain, no scratch file, no socket."""
    assert guest.job_type() == "None"
    assert os.listdir(backups_folder(daemon)) == []
    status, _, body = daemon.control("GET", "/backups/")
    assert status == 200 and json.loads(body) == []


def checkpoints(guest) -> list[str]:
    return virsh("checkpoint-list", guest.name, "--name",
                 "--topological").split()


def imageio_download(daemon, url: str, dest: str, unix: str,
                     *args: str) -> str:
    """The same download by ovirt-imageio's client library (which prints
    nothing)."""
    from ovirt_imageio import client

    if "--incremental" in args:
        backing = args[args.index("--backing-file") + 1]
        client.download(url, dest, daemon.ca_file, fmt="qcow2",
                        incremental=True, backing_file=backing,
                        backing_format="qcow2")
    else:
        client.download(url, dest, daemon.ca_file,
                        fmt="qcow2" if "qcow2" in args else "raw")
    return ""


#: Who reads each backup: the function that downloads, and its --unix
#: (diskferry download says which transport it took: the reader's name).
READERS: dict[str, tuple[Callable[..., str], str]] = {
    "unix": (download, "always"),
    "tls": (download, "never"),
    "imageio": (imageio_download, "any"),
}


def read_backup(daemon, disk: dict, folder: Path, name: str,
                backing: str | None = None) -> dict[str, str]:
    """``disk``'s backup as each reader downloads it, into
    ``folder/NAME-READER.qcow2``: a full backup into qcow2, an
    incremental as an overlay of the reader's own ``backing`` backup."""
    images = {}
    for reader, (fetch, unix) in READERS.items():
        image = str(folder / f"{name}-{reader}.qcow2")
        if backing is None:
            args: tuple[str, ...] = ("--format", "qcow2")
        else:
            args = ("--incremental", "--backing-file",
                    f"{backing}-{reader}.qcow2")
        summary = fetch(daemon, disk["transfer_url"], image, unix, *args)
        assert reader == "imageio" or f" via {reader} " in summary, summary
        images[reader] = image
    return images
