"""What a killed daemon's backup jobs leave in its run folder, met by the
daemon that starts next where libvirt cannot be asked about them: the
daemon starts and serves, and the files go (the jobs themselves are
ended by test_backup_chain.py's restart, where libvirt runs)."""

from __future__ import annotations

import os

import servers


def test_leftovers_without_virsh_do_not_stop_the_start(tmp_path, monkeypatch):
    left = tmp_path / "daemon" / ".diskferry" / "run" / "backups" / "5d1c0e2b"
    left.mkdir(parents=True)
    (left / "vda.scratch").write_bytes(b"\0" * 4096)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    srv = servers.start_server("diskferry", tmp_path / "daemon", tls=False,
                               local_socket=None)
    try:
        status, _, body = srv.control("GET", "/backups/")
    finally:
        srv.stop()
    assert (status, body) == (200, b"[]")
    assert os.listdir(left.parent) == []
    assert "backups a previous daemon left" in srv.log_text()
