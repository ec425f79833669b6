"""Backups of a running libvirt domain: what ``diskferry backup`` says
and refuses, and how a job ends, with nothing left behind.

One TCG guest with no operating system (it sits in firmware) for the
module (tests/libvirt_guest.py); the backups themselves, read by every
client and compared with the disk, are in test_backup_chain.py.
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
    Guest,
    assert_ended,
    backup,
    backups_folder,
    checkpoints,
    cli,
    download,
    public_folder,
    virsh,
)

#: One guest and one daemon for the module; no job left after a test.
guest = libvirt_guest.guest
daemon = libvirt_guest.daemon
no_job_left = libvirt_guest.no_job_left


# --- tests -------------------------------------------------------------------


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


def test_job_of_a_killed_daemon_is_ended(guest):
    """The daemon started again ends the job a killed one left: no job,
    no scratch file, no socket; the domain backs up again."""
    workdir = public_folder("diskferry-backupd-")
    try:
        srv = servers.start_server("diskferry", workdir, local_socket="path")
        backup(srv, guest)
        srv.kill()
        assert guest.job_type() == "Unbounded"
        assert os.listdir(backups_folder(srv)) != []
        srv = servers.start_server("diskferry", workdir, local_socket="path")
        try:
            assert_ended(srv, guest)
            job = backup(srv, guest)
            assert job["disks"][0]["transfer_url"]
            cli(srv, "backup", "stop", guest.name, "--socket",
                srv.control_socket)
            assert guest.job_type() == "None"
        finally:
            srv.stop()
    finally:
        guest.abort_job()
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
