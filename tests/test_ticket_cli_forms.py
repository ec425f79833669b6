"""``diskferry ticket`` as a person uses it: every form of IMAGE a ticket
takes, ids, and what ``list`` and ``show`` print, against a real daemon,
real files and a real qemu-nbd."""

import json
import os
import subprocess
import sys

import pytest

CA_FILE_HINT = "--cafile"


def ticket_cmd(server, *args):
    return subprocess.run(
        [sys.executable, "-m", "diskferry", "ticket", "--socket",
         server.control_socket, *map(str, args)],
        capture_output=True, text=True, timeout=60)


def client_cmd(server, *args):
    return subprocess.run(
        [sys.executable, "-m", "diskferry", *map(str, args), "--cafile",
         server.ca_file],
        capture_output=True, text=True, timeout=120)


@pytest.fixture
def df(daemons):
    return daemons.get("diskferry")


def add(server, *args):
    run = ticket_cmd(server, "add", *args)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


# --- file names with characters a URL gives a meaning to ---------------------


@pytest.mark.parametrize("name", [
    "what?.raw", "a#b.raw", "100%.raw", "50%41.raw", "with space.raw",
    "all ?#% of them.raw",
])
def test_file_names_name_the_file(df, tmp_path, name):
    """The ticket serves the file named, not the one a URL parser reads
    in its name: ``a#b`` is not ``a``, ``50%41`` is not ``50A``; it is
    read and written by a download and an upload."""
    image = tmp_path / name
    image.write_bytes(b"right" * 1000)
    for decoy in ("what", "a", "100", "50A.raw", "with", "all "):
        (tmp_path / decoy).write_bytes(b"wrong" * 1000)
    ticket_id = add(df, "--ops", "read,write", image)
    url = df.image_url(ticket_id)
    try:
        got = tmp_path / "got.raw"
        run = client_cmd(df, "download", "--quiet", url, got)
        assert run.returncode == 0, run.stderr
        assert got.read_bytes() == b"right" * 1000
        new = tmp_path / "new.raw"
        new.write_bytes(b"fresh" * 1000)
        run = client_cmd(df, "upload", "--quiet", new, url)
        assert run.returncode == 0, run.stderr
        assert image.read_bytes() == b"fresh" * 1000
        assert df.get_ticket(ticket_id)["size"] == 5000
    finally:
        df.delete_ticket(ticket_id)
    for decoy in ("what", "a", "100", "50A.raw", "with", "all "):
        assert (tmp_path / decoy).read_bytes() == b"wrong" * 1000


# --- ticket ids ---------------------------------------------------------------


@pytest.mark.parametrize("action", [
    ["add", "--id", "{id}", "disk.raw"], ["show", "{id}"], ["del", "{id}"],
    ["extend", "{id}", "60"],
])
@pytest.mark.parametrize("bad_id", ["sp ace", "a/b", "q?x", "h#x", "50%",
                                    "..", "é", ""])
def test_ids_a_url_cannot_carry_are_refused(df, action, bad_id):
    argv = [arg.replace("{id}", bad_id) for arg in action]
    run = ticket_cmd(df, *argv)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert "is not a ticket id" in last
    assert "letters, digits, '-', '_', '.' and '~' only" in last


def test_ids_of_unreserved_characters_work(df, tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"x" * 4096)
    for ticket_id in ("Up-1_a.b~c", "9", "...", "a..b"):
        assert add(df, "--id", ticket_id, image) == ticket_id
        assert df.get_ticket(ticket_id)["uuid"] == ticket_id
        run = client_cmd(df, "info", "--json", df.image_url(ticket_id))
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["size"] == 4096
        assert ticket_cmd(df, "del", ticket_id).returncode == 0


def test_relative_image_is_made_absolute(df, tmp_path):
    (tmp_path / "in here.raw").write_bytes(b"y" * 512)
    run = subprocess.run(
        [sys.executable, "-m", "diskferry", "ticket", "--socket",
         df.control_socket, "add", "in here.raw"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    info = df.get_ticket(run.stdout.strip())
    df.delete_ticket(info["uuid"])
    assert info["url"] == "file://" + os.fspath(tmp_path).replace(
        " ", "%20") + "/in%20here.raw"
