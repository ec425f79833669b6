"""Backups of a running libvirt domain: ``diskferry backup`` begins
libvirt's pull-mode job, the disks are downloaded with ``diskferry
download``, and the job and its files are gone when it ends.

One TCG guest with no operating system (it sits in firmware) for the
module; the guest's disk is written through the monitor (``qemu-io`` on
the disk's virtio device), and every write is made as well on a raw
reference file, so that each backup is compared with ``qemu-img
compare`` against the disk as it was when the backup began.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

import servers

MiB = 1 << 20
SIZE = 16 * MiB
VIRSH = ["virsh", "-q", "-c", "qemu:///system"]
#: The disk's block device as QEMU's monitor names it under libvirt 9.
DEVICE = "/machine/peripheral/virtio-disk0/virtio-backend"


def _libvirt_missing() -> str | None:
    """Why libvirt cannot run here, or None. CI has it: never a skip."""
    for cmd in ("virsh", "libvirtd", "virtlogd", "qemu-system-x86_64"):
        if shutil.which(cmd) is None:
            return f"{cmd} not installed (scripts/setup --test installs it)"
    if os.geteuid() != 0:
        return "qemu:///system needs root"
    return None


def _ensure_libvirtd() -> None:
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
            self._reference_write(0x11, offset, 512 * 1024)
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
        out = virsh("qemu-monitor-command", self.name, "--hmp",
                    f'qemu-io -d {DEVICE} "write -P {pattern:#x} {offset} '
                    f'{length}"')
        assert "error" not in out.lower(), out
        self._reference_write(pattern, offset, length)

    def snapshot(self, name: str) -> str:
        """A copy of the reference: the disk as it is now."""
        path = os.path.join(self.folder, name)
        shutil.copyfile(self.reference, path)
        return path

    def job_type(self) -> str:
        for line in virsh("domjobinfo", self.name).splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Job type":
                return value.strip()
        return ""

    def destroy(self) -> None:
        subprocess.run([*VIRSH, "destroy", self.name], capture_output=True)

    def _reference_write(self, pattern: int, offset: int,
                         length: int) -> None:
        subprocess.run(["qemu-io", "-f", "raw", "-c",
                        f"write -P {pattern:#x} {offset} {length}",
                        self.reference], check=True, capture_output=True)


@pytest.fixture(scope="module")
def guest():
    reason = _libvirt_missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"libvirt must run in CI: {reason}")
        pytest.skip(reason)
    _ensure_libvirtd()
    folder = public_folder("diskferry-guest-")
    g = Guest(folder)
    yield g
    g.destroy()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(guest):
    """A daemon whose run folder QEMU's user can reach."""
    workdir = public_folder("diskferry-backupd-")
    srv = servers.start_server("diskferry", workdir, local_socket="path")
    yield srv
    srv.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_job_left(request, guest, daemon):
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


def download(daemon, url: str, dest: str, unix: str, *args: str) -> None:
    cli(daemon, "download", url, dest, "--cafile", daemon.ca_file,
        "--unix", unix, *args, cwd=os.path.dirname(dest))


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


# --- tests -------------------------------------------------------------------


def imageio_download(daemon, url: str, dest: str, unix: str,
                     *args: str) -> None:
    """The same download by ovirt-imageio's client library."""
    from ovirt_imageio import client

    if "--incremental" in args:
        backing = args[args.index("--backing-file") + 1]
        client.download(url, dest, daemon.ca_file, fmt="qcow2",
                        incremental=True, backing_file=backing,
                        backing_format="qcow2")
    else:
        client.download(url, dest, daemon.ca_file,
                        fmt="qcow2" if "qcow2" in args else "raw")


@pytest.mark.parametrize("unix, fetch", [
    ("always", download), ("never", download), ("any", imageio_download),
], ids=["diskferry-unix", "diskferry-tls", "ovirt-imageio"])
def test_full_then_incremental(daemon, guest, tmp_path, unix, fetch):
    guest.write(0x22, 1 * MiB, 64 * 1024)
    at_full = guest.snapshot(f"full-{unix}.raw")
    full = backup(daemon, guest, "--full")
    assert full["since"] is None
    assert full["checkpoint"] in checkpoints(guest)
    disk, raw_disk = full["disks"]
    assert (disk["name"], disk["size"], disk["dirty"]) == ("vda", SIZE, False)
    assert (raw_disk["name"], raw_disk["size"], raw_disk["dirty"]) == \
        ("vdb", RAW_SIZE, False)
    raw_image = str(tmp_path / "vdb.raw")
    fetch(daemon, raw_disk["transfer_url"], raw_image, unix)
    subprocess.run(["cmp", raw_image, guest.raw_disk], check=True)
    assert guest.job_type() == "Unbounded"
    # During the job: not in this backup.
    guest.write(0x33, 2 * MiB, 128 * 1024)
    full_image = str(tmp_path / "full.qcow2")
    fetch(daemon, disk["transfer_url"], full_image, unix,
             "--format", "qcow2")
    assert_same(full_image, at_full)
    cli(daemon, "backup", "stop", guest.name, "--socket",
        daemon.control_socket)
    assert_ended(daemon, guest)

    guest.write(0x44, 6 * MiB, 192 * 1024)
    at_incremental = guest.snapshot(f"incremental-{unix}.raw")
    incremental = backup(daemon, guest, "--since", full["checkpoint"])
    assert incremental["since"] == full["checkpoint"]
    assert incremental["checkpoint"] > full["checkpoint"]
    [disk] = incremental["disks"]  # vdb is raw: in full backups only
    assert disk["name"] == "vda"
    assert disk["dirty"]
    guest.write(0x55, 6 * MiB, 64 * 1024)
    overlay = str(tmp_path / "incremental.qcow2")
    fetch(daemon, disk["transfer_url"], overlay, unix, "--incremental",
             "--backing-file", "full.qcow2")
    assert_same(overlay, at_incremental)
    # Only what changed since the checkpoint went into the overlay.
    allocated = subprocess.run(
        ["qemu-img", "map", "--output=json", overlay], check=True,
        capture_output=True, text=True).stdout
    top = [e for e in json.loads(allocated) if e["depth"] == 0 and e["data"]]
    assert sum(e["length"] for e in top) < 1 * MiB
    # The job ends with its last ticket.
    cli(daemon, "ticket", "del", disk["ticket"], "--socket",
        daemon.control_socket)
    assert_ended(daemon, guest)


def test_list_shows_job_and_checkpoints(daemon, guest):
    job = backup(daemon, guest)
    listing = json.loads(cli(daemon, "backup", "list", "--json", "--socket",
                             daemon.control_socket).stdout)
    assert [j["checkpoint"] for j in listing] == [job["checkpoint"]]
    text = cli(daemon, "backup", "list", guest.name, "--socket",
               daemon.control_socket).stdout
    assert job["checkpoint"] in text
    assert job["disks"][0]["transfer_url"] in text
    info = daemon.get_ticket(job["disks"][0]["ticket"])
    assert info["export"]["kind"] == "libvirt-backup"
    assert info["export"]["running"]


def test_expiry_ends_the_job_and_its_ticket_says_so(daemon, guest):
    job = backup(daemon, guest, "--timeout", "1")
    ticket = job["disks"][0]["ticket"]
    deadline = time.monotonic() + 30
    while guest.job_type() != "None":
        assert time.monotonic() < deadline, "the job outlived its ticket"
        time.sleep(0.2)
    assert_ended(daemon, guest)
    # Extended, the ticket cannot bring the job back: it says why.
    daemon.extend_ticket(ticket, 60)
    con = daemon.local_connection()
    try:
        con.request("GET", f"/images/{ticket}")
        res = con.getresponse()
        body = res.read().decode()
    finally:
        con.close()
    assert res.status == 403
    assert "backup job" in body and "ended" in body
    daemon.delete_ticket(ticket)


@pytest.mark.parametrize("args, message", [
    (["--since", "no-such-checkpoint"], "has no checkpoint 'no-such-"),
    (["--disk", "vdz"], "No disk 'vdz'"),
    (["--since", "any", "--disk", "vdb"], "is raw: libvirt keeps checkpoints"),
])
def test_refused_start_leaves_nothing(daemon, guest, args, message):
    done = cli(daemon, "backup", "start", guest.name, "--socket",
               daemon.control_socket, *args, check=False)
    assert done.returncode == 1
    assert message in done.stderr
    assert_ended(daemon, guest)


def test_unknown_domain(daemon):
    done = cli(daemon, "backup", "start", "no-such-domain", "--socket",
               daemon.control_socket, check=False)
    assert done.returncode == 1
    assert "no-such-domain" in done.stderr


def test_second_backup_of_a_domain_conflicts(daemon, guest):
    backup(daemon, guest)
    done = cli(daemon, "backup", "start", guest.name, "--socket",
               daemon.control_socket, check=False)
    assert done.returncode == 1
    assert "409" in done.stderr and "running already" in done.stderr
    assert guest.job_type() == "Unbounded"


def test_daemon_stop_ends_the_job(guest):
    workdir = public_folder("diskferry-backupd-")
    try:
        srv = servers.start_server("diskferry", workdir, local_socket="path")
        try:
            backup(srv, guest)
            assert guest.job_type() == "Unbounded"
        finally:
            srv.stop()
        assert guest.job_type() == "None"
        assert os.listdir(backups_folder(srv)) == []
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_job_of_another_daemon_conflicts(daemon, guest):
    workdir = public_folder("diskferry-backupd-")
    other = servers.start_server("diskferry", workdir, local_socket="path")
    try:
        backup(other, guest)
        done = cli(daemon, "backup", "start", guest.name, "--socket",
                   daemon.control_socket, check=False)
        assert done.returncode == 1
        assert "Another job runs" in done.stderr
        assert os.listdir(backups_folder(daemon)) == []
    finally:
        other.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    assert guest.job_type() == "None"


@pytest.mark.parametrize("then", ["start", "stop"])
def test_job_of_a_killed_daemon_is_ended(guest, then):
    workdir = public_folder("diskferry-backupd-")
    try:
        srv = servers.start_server("diskferry", workdir, local_socket="path")
        backup(srv, guest)
        srv.kill()
        assert guest.job_type() == "Unbounded"
        srv = servers.start_server("diskferry", workdir, local_socket="path")
        try:
            assert os.listdir(backups_folder(srv)) == []
            if then == "start":
                job = backup(srv, guest)
                assert job["disks"][0]["transfer_url"]
            cli(srv, "backup", "stop", guest.name, "--socket",
                srv.control_socket)
            assert guest.job_type() == "None"
        finally:
            srv.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_stopped_domain_whose_disk_is_not_its_format_is_refused(daemon,
                                                                guest):
    name = f"{guest.name}-off"
    xml = os.path.join(guest.folder, "off.xml")
    with open(xml, "w") as f:
        f.write(DOMAIN_XML.format(name=name, disk=guest.reference, more=""))
    virsh("define", xml)
    try:
        done = cli(daemon, "backup", "start", name, "--socket",
                   daemon.control_socket, check=False)
        assert virsh("checkpoint-list", name, "--name").split() == []
    finally:
        virsh("undefine", name, "--checkpoints-metadata")
    assert done.returncode == 1
    assert "Disk 'vda'" in done.stderr
    assert "cannot read it as qcow2" in done.stderr
    assert os.listdir(backups_folder(daemon)) == []


def test_raw_disk_alone_makes_no_checkpoint(daemon, guest, tmp_path):
    before = checkpoints(guest)
    job = backup(daemon, guest, "--disk", "vdb")
    assert job["checkpoint"] is None
    assert [d["name"] for d in job["disks"]] == ["vdb"]
    assert checkpoints(guest) == before
    image = str(tmp_path / "vdb.raw")
    download(daemon, job["disks"][0]["transfer_url"], image, "always")
    subprocess.run(["cmp", image, guest.raw_disk], check=True)


def test_backup_stop_after_the_domain_is_destroyed(daemon):
    folder = public_folder("diskferry-guest-")
    doomed = Guest(folder)
    try:
        job = backup(daemon, doomed)
        doomed.destroy()
        cli(daemon, "backup", "stop", doomed.name, "--socket",
            daemon.control_socket)
        assert os.listdir(backups_folder(daemon)) == []
        tickets = json.loads(daemon.control("GET", "/tickets/")[2])
        assert not {d["ticket"] for d in job["disks"]} & {
            t["uuid"] for t in tickets}
    finally:
        doomed.destroy()
        shutil.rmtree(folder, ignore_errors=True)
