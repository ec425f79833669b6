"""``diskferry ticket`` against a running daemon's control socket."""

import json
import subprocess
import sys

import pytest


def ticket_cmd(server, *args):
    return subprocess.run(
        [sys.executable, "-m", "diskferry", "ticket", "--socket",
         server.control_socket, *args],
        capture_output=True, text=True, timeout=60)


@pytest.fixture
def df(daemons):
    return daemons.get("diskferry")


def test_add_show_extend_delete(df, tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"x" * 8192)
    run = ticket_cmd(df, "add", "--ops", "read,write", "--sparse",
                     "--transfer-id", "t-cli", "--timeout", "100", str(image))
    assert run.returncode == 0, run.stderr
    ticket_id = run.stdout.strip()

    info = json.loads(ticket_cmd(df, "show", ticket_id).stdout)
    assert info["size"] == 8192
    assert info["url"] == f"file://{image}"
    assert info["ops"] == ["read", "write"]
    assert info["sparse"] is True
    assert info["transfer_id"] == "t-cli"

    before = info["expires"]
    assert ticket_cmd(df, "extend", ticket_id, "1000").returncode == 0
    assert df.get_ticket(ticket_id)["expires"] >= before + 890

    assert ticket_cmd(df, "del", ticket_id).returncode == 0
    run = ticket_cmd(df, "show", ticket_id)
    assert run.returncode == 1
    assert "404" in run.stderr and ticket_id in run.stderr


def test_add_with_id_and_delete_all(df, tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"")
    for name in ("cli-a", "cli-b"):
        run = ticket_cmd(df, "add", "--id", name, "--size", "4096",
                         str(image))
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == name
    assert df.get_ticket("cli-a")["size"] == 4096
    assert ticket_cmd(df, "del", "--all").returncode == 0
    for name in ("cli-a", "cli-b"):
        assert ticket_cmd(df, "show", name).returncode == 1


def test_errors_are_one_line(df, tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"")
    run = ticket_cmd(df, "add", "--ops", "read,delete", str(image))
    assert run.returncode == 1
    assert "'ops'" in run.stderr and "Traceback" not in run.stderr
    run = ticket_cmd(df, "add", str(tmp_path / "missing.raw"))
    assert run.returncode == 1
    assert "cannot read the size" in run.stderr
    assert "Traceback" not in run.stderr
    run = ticket_cmd(df, "del")
    assert run.returncode == 1
    assert "give a ticket id or --all" in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "diskferry", "ticket", "--socket",
         str(tmp_path / "none.sock"), "show", "x"],
        capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "cannot reach the control socket" in run.stderr


def test_add_nbd_export_takes_its_size(df, tmp_path):
    import nbd_servers

    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image),
                    "3M"], check=True)
    with nbd_servers.start_export("qemu-nbd", image, fmt="qcow2") as export:
        run = ticket_cmd(df, "add", "--ops", "read", "--dirty", export.url)
        assert run.returncode == 0, run.stderr
        info = df.get_ticket(run.stdout.strip())
    assert info["url"] == export.url
    assert info["size"] == 3 * 1024**2
    assert info["dirty"] is True


def test_add_nbd_errors(df, tmp_path):
    run = ticket_cmd(df, "add", f"nbd:unix:{tmp_path}/none.sock")
    assert run.returncode == 1
    assert "cannot read the size" in run.stderr and "give --size" in run.stderr
    assert "Traceback" not in run.stderr
    run = ticket_cmd(df, "add", "--size", "4096", "nbd:unix:relative.sock")
    assert run.returncode == 1
    assert "'url'" in run.stderr and "not absolute" in run.stderr
