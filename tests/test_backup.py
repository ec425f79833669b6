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
import time

import pytest

import libvirt_guest
import servers
from libvirt_guest import (
    DOMAIN_XML,
    RAW_SIZE,
    SIZE,
    Guest,
    MiB,
    assert_ended,
    assert_same,
    backup,
    backups_folder,
    checkpoints,
    cli,
    download,
    imageio_download,
    public_folder,
    virsh,
)

#: One guest and one daemon for the module; no job left after a test.
guest = libvirt_guest.guest
daemon = libvirt_guest.daemon
no_job_left = libvirt_guest.no_job_left


# --- tests -------------------------------------------------------------------


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


def test_stopped_domain_is_refused(daemon, guest):
    name = f"{guest.name}-off"
    xml = os.path.join(guest.folder, "off.xml")
    with open(xml, "w") as f:
        f.write(DOMAIN_XML.format(name=name, disk=guest.reference, more=""))
    virsh("define", xml)
    try:
        done = cli(daemon, "backup", "start", name, "--socket",
                   daemon.control_socket, check=False)
    finally:
        virsh("undefine", name, "--checkpoints-metadata")
    assert done.returncode == 1
    assert "shut off" in done.stderr and "running domain" in done.stderr
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
