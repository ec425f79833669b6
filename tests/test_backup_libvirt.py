"""How the daemon talks to libvirt: what a host without it is told, and
the XML a backup begins with."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET

import pytest

import servers
from diskferry.daemon.backup.job import checkpoint_name
from diskferry.daemon.backup.libvirt import (
    LibvirtUnavailable,
    Virsh,
    backup_xml,
    checkpoint_xml,
)


def test_no_virsh_says_what_is_missing(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(LibvirtUnavailable, match="libvirt-clients") as e:
        Virsh().state("vm1")
    assert e.value.status == 503


def test_daemon_without_virsh_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    srv = servers.start_server("diskferry", tmp_path / "daemon", tls=False,
                               local_socket=None)
    try:
        status, _, body = srv.control("POST", "/backups/vm1", {})
        tickets = srv.control("GET", "/tickets/")
    finally:
        srv.stop()
    assert status == 503
    assert b"virsh not found" in body and b"libvirt-clients" in body
    assert tickets[0] == 200 and tickets[2] == b"[]"


@pytest.mark.skipif(shutil.which("virsh") is None, reason="no virsh")
def test_unreachable_libvirtd_is_unavailable(tmp_path):
    virsh = Virsh(f"qemu+unix:///system?socket={tmp_path}/none.sock")
    with pytest.raises(LibvirtUnavailable, match="Failed to connect"):
        virsh.state("vm1")


def test_incremental_backup_xml():
    root = ET.fromstring(backup_xml("/run/b/nbd.sock", {"vda": "/run/b/s"},
                                    ["vdb"], "cp1"))
    assert root.get("mode") == "pull"
    assert root.findtext("incremental") == "cp1"
    server = root.find("server")
    assert server is not None
    assert (server.get("transport"), server.get("socket")) == \
        ("unix", "/run/b/nbd.sock")
    disks = {d.get("name"): d for d in root.iterfind("disks/disk")}
    assert disks["vda"].get("backup") == "yes"
    assert disks["vda"].find("scratch").get("file") == "/run/b/s"
    assert disks["vdb"].get("backup") == "no"


def test_full_backup_xml_has_no_incremental():
    root = ET.fromstring(backup_xml("/s", {"vda": "/x"}, [], None))
    assert root.find("incremental") is None


def test_checkpoint_xml():
    root = ET.fromstring(checkpoint_xml("cp2", ["vda"], ["vdb"]))
    assert root.findtext("name") == "cp2"
    assert [(d.get("name"), d.get("checkpoint"))
            for d in root.iterfind("disks/disk")] == \
        [("vda", "bitmap"), ("vdb", "no")]


def test_checkpoint_names_sort_by_time():
    import datetime

    early = datetime.datetime(2026, 1, 2, 3, 4, 5, 6,
                              tzinfo=datetime.UTC)
    late = early + datetime.timedelta(microseconds=1)
    assert checkpoint_name(early) < checkpoint_name(late)
    assert checkpoint_name(early) == "diskferry-20260102T030405-000006"
