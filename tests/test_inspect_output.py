"""``diskferry map`` and ``diskferry info`` writing into a pipe whose
reader goes away, as ``| head`` does: the command ends quietly."""

import itertools
import json
import subprocess
import sys

import pytest

from servers import make_sparse_file, ticket_dict

#: Data blocks in the image: each is a line of ``map`` with the hole
#: after it, far more than a pipe holds (64 KiB) once ``head`` is gone.
BLOCKS = 2000


@pytest.fixture
def fragmented(daemons, tmp_path):
    server = daemons.get("diskferry")
    image = make_sparse_file(tmp_path / "fragmented.raw", BLOCKS * 65536, {
        i * 65536: b"\xff" * 4096 for i in range(BLOCKS)})
    ticket = ticket_dict(image, BLOCKS * 65536, ops=("read",))
    server.add_ticket(ticket)
    yield server, server.image_url(ticket["uuid"])
    server.delete_ticket(ticket["uuid"])


def head(command, option, tmp_path):
    """``command | head OPTION`` in a shell: (what head printed, the
    command's stderr, its exit status)."""
    err = tmp_path / "stderr"
    script = (f"{command} 2>{err} | head {option}; "
              f"echo \"${{PIPESTATUS[0]}}\" >&2")
    run = subprocess.run(["bash", "-c", script], capture_output=True,
                         text=True, timeout=120)
    return run.stdout, err.read_text(), int(run.stderr.strip())


def diskferry(*args):
    return " ".join([sys.executable, "-m", "diskferry", *map(str, args)])


@pytest.mark.parametrize("output,option", [([], "-4"), (["--json"], "-c 100")])
def test_map_into_head_ends_quietly(fragmented, tmp_path, output, option):
    server, url = fragmented
    shown, errors, status = head(
        diskferry("map", *output, "--cafile", server.ca_file, url), option,
        tmp_path)
    assert errors == ""
    assert status == 141
    if output:
        assert shown.startswith('[{"start": 0, "length": 4096')
    else:
        assert shown.split("\n")[0].split() == ["start", "length", "size",
                                                "type"]
        assert shown.split("\n")[1].split()[-1] == "data"
        assert len(shown.splitlines()) == 4


def test_map_whole_output_unchanged(fragmented):
    server, url = fragmented
    run = subprocess.run(
        [sys.executable, "-m", "diskferry", "map", "--json", "--cafile",
         server.ca_file, url], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    extents = json.loads(run.stdout)
    assert [e["type"] for e in extents[:4]] == ["data", "hole", "data", "hole"]
    assert sum(e["type"] == "data" for e in extents) == BLOCKS


def test_info_into_a_closed_pipe_ends_quietly(fragmented, tmp_path):
    server, url = fragmented
    shown, errors, status = head(
        diskferry("info", "--cafile", server.ca_file, url), "-c 0", tmp_path)
    assert shown == "" and errors == ""
    assert status in (0, 141)


MiB = 1024**2


@pytest.fixture
def backup(daemons, tmp_path):
    """A backup ticket: a qcow2 with a bitmap, served by qemu-nbd."""
    import nbd_servers

    server = daemons.get("diskferry")
    disk = tmp_path / "disk.qcow2"
    nbd_servers.qemu_img("create", "-q", "-f", "qcow2", disk, 8 * MiB)
    nbd_servers.qemu_io(disk, "qcow2", "write -P 0x11 0 4M")
    nbd_servers.qemu_img("bitmap", "--add", disk, "b1")
    nbd_servers.qemu_io(disk, "qcow2", "write -P 0x22 1M 64k",
                        "write -z 2M 64k", "write -P 0x23 6M 1M")
    with nbd_servers.start_export("qemu-nbd", disk, fmt="qcow2",
                                  read_only=True, bitmap="b1") as export:
        ticket = ticket_dict("/unused", 8 * MiB, ("read",), url=export.url,
                             dirty=True)
        server.add_ticket(ticket)
        yield server, server.image_url(ticket["uuid"])
        server.delete_ticket(ticket["uuid"])


def run_map(server, url, *args):
    return subprocess.run(
        [sys.executable, "-m", "diskferry", "map", *args, "--cafile",
         server.ca_file, url], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("context", ["zero", "dirty"])
def test_map_rows_alike_are_one(backup, context):
    """No two adjacent rows read the same: data, zeros and holes split
    what is clean or dirty alike."""
    server, url = backup
    run = run_map(server, url, "--context", context)
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines()[1:]]
    assert all(a[-1] != b[-1] for a, b in itertools.pairwise(rows)), run.stdout
    assert sum(int(row[1]) for row in rows) == 8 * MiB
    assert all(int(a[0]) + int(a[1]) == int(b[0])
               for a, b in itertools.pairwise(rows))
    listed = json.loads(run_map(server, url, "--context", context,
                                "--json").stdout)
    assert [(e["start"], e["length"], e["type"]) for e in listed] == \
        [(int(row[0]), int(row[1]), row[-1]) for row in rows]
    if context == "dirty":
        assert [row[-1] for row in rows] == ["clean", "dirty", "clean",
                                             "dirty", "clean", "dirty",
                                             "clean"], run.stdout


def test_map_dirty_refused_prints_no_heading(daemons, tmp_path):
    server = daemons.get("diskferry")
    image = make_sparse_file(tmp_path / "disk.raw", MiB, {0: b"x" * 4096})
    ticket = ticket_dict(image, MiB, ops=("read",))
    server.add_ticket(ticket)
    try:
        run = run_map(server, server.image_url(ticket["uuid"]),
                      "--context", "dirty")
    finally:
        server.delete_ticket(ticket["uuid"])
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.startswith("diskferry map: error: ")
    assert len(run.stderr.splitlines()) == 1
