"""Backups when the domain is not running: a domain that stops during a
backup, and backups of a domain that is shut off.

One persistent TCG guest for the module (it survives ``virsh
destroy``), started and stopped by the tests; while it is shut off its
disk is written offline with ``qemu-io``, so that the disk file itself
is the reference each backup is compared with.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import time
import uuid

import pytest

import libvirt_guest
import servers
from libvirt_guest import (
    DOMAIN_XML,
    RAW_SIZE,
    MiB,
    backup,
    backups_folder,
    checkpoints,
    cli,
    download,
    imageio_download,
    public_folder,
    read_backup,
    virsh,
)

VIRSH = ["virsh", "-q", "-c", "qemu:///system"]

#: Larger than every buffer between the daemon and a client, so that a
#: GET of the whole disk is still being sent when the domain stops.
SIZE = 64 * MiB

#: The raw disk, which libvirt backs up in full only.
VDB_XML = ("<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
           "<source file='{disk}'/><target dev='vdb' bus='virtio'/></disk>")

#: The backup tests' daemon, and no job left after a test.
daemon = libvirt_guest.daemon
no_job_left = libvirt_guest.no_job_left


class StoppableGuest:
    """A defined domain whose qcow2 disk vda has data at 0 and 8 MiB; vdb
    is raw."""

    def __init__(self, folder: str) -> None:
        self.name = f"diskferry-stopped-{uuid.uuid4().hex[:8]}"
        self.folder = folder
        self.disk = os.path.join(folder, "vda.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", self.disk,
                        str(SIZE)], check=True)
        for offset in (0, 8 * MiB):
            self.write_offline(0x11, offset, 1 * MiB)
        self.raw_disk = os.path.join(folder, "vdb.raw")
        with open(self.raw_disk, "wb") as f:
            f.truncate(RAW_SIZE)
            f.write(b"\x77" * 65536)
        xml = DOMAIN_XML.format(name=self.name, disk=self.disk,
                                more=VDB_XML.format(disk=self.raw_disk))
        subprocess.run([*VIRSH, "define", "/dev/stdin"], input=xml,
                       text=True, check=True, capture_output=True)

    def write_offline(self, pattern: int, offset: int, length: int) -> None:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                        f"write -P {pattern:#x} {offset} {length}",
                        self.disk], check=True, capture_output=True)

    def state(self) -> str:
        return virsh("domstate", self.name).strip()

    def start(self) -> None:
        if self.state() != "running":
            virsh("start", self.name)

    def destroy(self) -> None:
        subprocess.run([*VIRSH, "destroy", self.name], capture_output=True)

    def has_job(self) -> bool:
        done = subprocess.run([*VIRSH, "domjobinfo", self.name],
                              capture_output=True, text=True)
        if done.returncode:
            assert "not running" in done.stderr, done.stderr
            return False
        return "Job type:         None" not in done.stdout

    def undefine(self) -> None:
        self.destroy()
        subprocess.run([*VIRSH, "undefine", self.name,
                        "--checkpoints-metadata"], capture_output=True)


def libvirt_up() -> bool:
    return subprocess.run([*VIRSH, "version"], capture_output=True,
                          check=False).returncode == 0


@pytest.fixture(scope="module")
def guest():
    if os.geteuid() != 0 or shutil.which("libvirtd") is None:
        if os.environ.get("CI"):
            pytest.fail("libvirt must run in CI (scripts/setup --test)")
        pytest.skip("needs root and libvirt (scripts/setup --test)")
    if not libvirt_up():
        # No systemd here: the daemons start themselves (a second one
        # exits at once, finding the first's pid file).
        for name in ("virtlogd", "libvirtd"):
            subprocess.run([name, "-d"], check=False)
        deadline = time.monotonic() + 30
        while not libvirt_up():
            assert time.monotonic() < deadline, "libvirtd did not start"
            time.sleep(0.2)
    folder = public_folder("diskferry-stopped-")
    g = StoppableGuest(folder)
    yield g
    g.undefine()
    shutil.rmtree(folder, ignore_errors=True)


def running_jobs(daemon) -> list[dict]:
    status, _, body = daemon.control("GET", "/backups/")
    assert status == 200
    return json.loads(body)


def get(daemon, ticket: str) -> tuple[int, str]:
    con = daemon.local_connection()
    try:
        con.request("GET", f"/images/{ticket}")
        res = con.getresponse()
        return res.status, res.read().decode(errors="replace")
    finally:
        con.close()


# --- the domain stops during a backup ----------------------------------------


def test_domain_destroyed_mid_transfer(daemon, guest, tmp_path):
    guest.start()
    job = backup(daemon, guest)
    ticket = job["disks"][0]["ticket"]
    con = daemon.local_connection()
    try:
        con.request("GET", f"/images/{ticket}")
        res = con.getresponse()
        assert res.status == 200
        assert res.read(1 * MiB) == b"\x11" * MiB
        guest.destroy()
        with pytest.raises(http.client.IncompleteRead):
            res.read()
    finally:
        con.close()
    deadline = time.monotonic() + 10
    while running_jobs(daemon):
        assert time.monotonic() < deadline, "the job outlived its domain"
        time.sleep(0.05)
    assert os.listdir(backups_folder(daemon)) == []
    assert not guest.has_job()
    # Its ticket stays, and says why nothing is served any more.
    status, body = get(daemon, ticket)
    assert status == 410
    assert f"domain '{guest.name}'" in body and "the domain stopped" in body
    done = cli(daemon, "download", job["disks"][0]["transfer_url"],
               str(tmp_path / "vda.qcow2"), "--cafile", daemon.ca_file,
               "--unix", "always", check=False)
    assert done.returncode == 1
    assert "410" in done.stderr and "the domain stopped" in done.stderr
    # ovirt-imageio's client says the same.
    with pytest.raises(Exception, match="the domain stopped") as e:
        imageio_download(daemon, job["disks"][0]["transfer_url"],
                         str(tmp_path / "vda.raw"), "any")
    assert e.value.args[0] == 410
    cli(daemon, "backup", "stop", guest.name, "--socket",
        daemon.control_socket)
    tickets = json.loads(daemon.control("GET", "/tickets/")[2])
    assert ticket not in {t["uuid"] for t in tickets}
    assert "Traceback" not in daemon.log_text()


# --- a shut off domain ---------------------------------------------------------


def assert_same_as_disk(image: str, guest) -> None:
    """``image`` reads as the disk file does now (-U: the backup's export
    may hold the disk's lock)."""
    done = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F",
                           "qcow2", image, guest.disk], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def bitmaps(guest) -> list[str]:
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", guest.disk], check=True,
        capture_output=True, text=True).stdout)
    return [b["name"] for b in
            info["format-specific"]["data"].get("bitmaps", [])]


def top_layer_bytes(image: str) -> int:
    """Bytes an overlay holds itself (its backing file's excluded)."""
    extents = json.loads(subprocess.run(
        ["qemu-img", "map", "--output=json", image], check=True,
        capture_output=True, text=True).stdout)
    return sum(e["length"] for e in extents if e["depth"] == 0 and e["data"])


def test_stopped_domain_full_then_incremental(daemon, guest, tmp_path):
    guest.destroy()
    full = backup(daemon, guest, "--full")
    assert full["checkpoint"] in checkpoints(guest)
    assert full["checkpoint"] in bitmaps(guest)
    disk, raw_disk = full["disks"]
    assert (disk["name"], disk["size"], disk["dirty"]) == ("vda", SIZE, False)
    assert (raw_disk["name"], raw_disk["size"]) == ("vdb", RAW_SIZE)
    # The raw disk too is served by the daemon's qemu-nbd, holding its lock.
    info = daemon.get_ticket(raw_disk["ticket"])["export"]
    assert info["export"]["kind"] == "qemu-nbd"
    raw_image = str(tmp_path / "vdb.raw")
    download(daemon, raw_disk["transfer_url"], raw_image, "always")
    subprocess.run(["cmp", raw_image, guest.raw_disk], check=True)
    info = daemon.get_ticket(disk["ticket"])["export"]
    assert info["kind"] == "libvirt-backup" and info["export"]["running"]
    # The export holds the disk: the domain cannot start meanwhile.
    done = subprocess.run([*VIRSH, "start", guest.name], capture_output=True,
                          text=True)
    assert done.returncode and "lock" in done.stderr, done.stderr
    for image in read_backup(daemon, disk, tmp_path, "full").values():
        assert_same_as_disk(image, guest)
    cli(daemon, "backup", "stop", guest.name, "--socket",
        daemon.control_socket)
    assert running_jobs(daemon) == []

    guest.write_offline(0x22, 2 * MiB, 64 * 1024)
    guest.write_offline(0x33, 8 * MiB + 512 * 1024, 128 * 1024)
    incremental = backup(daemon, guest, "--since", full["checkpoint"])
    assert incremental["since"] == full["checkpoint"]
    assert incremental["checkpoint"] > full["checkpoint"]
    [disk] = incremental["disks"]
    assert disk["dirty"]
    overlays = read_backup(daemon, disk, tmp_path, "incremental",
                           backing="full")
    for overlay in overlays.values():
        assert_same_as_disk(overlay, guest)
        assert top_layer_bytes(overlay) == 192 * 1024
    # The last ticket's delete ends the job and its export.
    cli(daemon, "ticket", "del", disk["ticket"], "--socket",
        daemon.control_socket)
    assert running_jobs(daemon) == []

    # The checkpoint made offline is one a running domain starts from.
    at_start = str(tmp_path / "at-start.qcow2")
    shutil.copyfile(guest.disk, at_start)
    guest.start()
    running = backup(daemon, guest, "--since", incremental["checkpoint"])
    [disk] = running["disks"]
    second = str(tmp_path / "second.qcow2")
    download(daemon, disk["transfer_url"], second, "always",
             "--incremental", "--backing-file", "incremental-tls.qcow2")
    done = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F",
                           "qcow2", second, at_start], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout
    assert top_layer_bytes(second) == 0
    cli(daemon, "backup", "stop", guest.name, "--socket",
        daemon.control_socket)
    guest.destroy()


def test_a_disk_another_program_holds_is_refused(daemon, guest):
    """The image's lock refuses what a running domain would refuse: here
    another daemon's backup of the shut off domain holds the disks."""
    guest.destroy()
    workdir = public_folder("diskferry-backupd-")
    other = servers.start_server("diskferry", workdir, local_socket="path")
    try:
        backup(other, guest, "--disk", "vda")
        before = (checkpoints(guest), bitmaps(guest))
        done = cli(daemon, "backup", "start", guest.name, "--disk", "vda",
                   "--socket", daemon.control_socket, check=False)
        assert done.returncode == 1
        assert "409" in done.stderr and "Disk 'vda'" in done.stderr
        assert "lock" in done.stderr, done.stderr
        assert (checkpoints(guest), bitmaps(guest)) == before
        assert running_jobs(daemon) == []
        # A killed daemon's exports die with it: the disks are free.
        other.kill()
        deadline = time.monotonic() + 10
        while cli(daemon, "backup", "start", guest.name, "--disk", "vda",
                  "--socket", daemon.control_socket, check=False).returncode:
            assert time.monotonic() < deadline, "the killed daemon's " \
                "export holds the disk"
            time.sleep(0.05)
    finally:
        other.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- pruning checkpoints ---------------------------------------------------------


def prune(daemon, guest, *args: str, check: bool = True):
    return cli(daemon, "backup", "prune", guest.name, "--socket",
               daemon.control_socket, *args, check=check)


def test_prune_keeps_the_newest(daemon, guest):
    guest.destroy()
    lost = backup(daemon, guest, "--disk", "vda")["checkpoint"]
    cli(daemon, "backup", "stop", guest.name, "--socket",
        daemon.control_socket)
    # As a domain killed before QEMU stored its bitmaps leaves it.
    subprocess.run(["qemu-img", "bitmap", "--remove", guest.disk, lost],
                   check=True)
    guest.start()
    made = [backup(daemon, guest)["checkpoint"]]
    done = prune(daemon, guest, "--keep", "1", check=False)
    assert done.returncode == 1
    assert "409" in done.stderr and "is running" in done.stderr
    for _ in range(2):
        cli(daemon, "backup", "stop", guest.name, "--socket",
            daemon.control_socket)
        made.append(backup(daemon, guest)["checkpoint"])
    cli(daemon, "backup", "stop", guest.name, "--socket",
        daemon.control_socket)
    before = checkpoints(guest)
    answer = json.loads(prune(daemon, guest, "--keep", "1", "--json").stdout)
    assert answer["kept"] == [made[-1]]
    assert {lost, *made[:-1]} <= set(answer["removed"])
    assert set(answer["removed"]) == set(before) - {made[-1]}
    assert checkpoints(guest) == [made[-1]]
    guest.destroy()
    assert bitmaps(guest) == [made[-1]]

    # A shut off domain's: libvirt deletes none, the daemon does.
    made.append(backup(daemon, guest)["checkpoint"])
    cli(daemon, "backup", "stop", guest.name, "--socket",
        daemon.control_socket)
    text = prune(daemon, guest, "--keep", "1").stdout
    assert f"removed {made[-2]}" in text and f"kept: {made[-1]}" in text
    assert checkpoints(guest) == [made[-1]]
    assert bitmaps(guest) == [made[-1]]
    # The checkpoint left is one the next backup starts from.
    job = backup(daemon, guest, "--since", made[-1])
    assert job["since"] == made[-1]
    text = prune(daemon, guest, "--keep", "0", check=False)
    assert text.returncode == 1 and "is running" in text.stderr


@pytest.mark.parametrize("body, message", [
    ({}, "keep"), ({"keep": -1}, "keep"), ({"keep": "1"}, "keep"),
])
def test_prune_refuses_a_bad_request(daemon, guest, body, message):
    status, _, text = daemon.control("POST", f"/backups/{guest.name}/prune",
                                     body)
    assert status == 400 and message in text.decode()
