"""A chain of backups of a running domain, read by every client: a full
backup and two incrementals, each downloaded by ``diskferry download``
over the UNIX socket and over TLS and by ovirt-imageio's client library,
each point compared with ``qemu-img compare`` against the disk as it was
when its backup began (the guest writes during every job).

One guest and one daemon for the module (tests/libvirt_guest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import libvirt_guest
from libvirt_guest import (
    RAW_SIZE,
    READERS,
    SIZE,
    MiB,
    assert_ended,
    assert_same,
    backup,
    checkpoints,
    cli,
    read_backup,
)

#: One guest and one daemon for the module; no job left after a test.
guest = libvirt_guest.guest
daemon = libvirt_guest.daemon
no_job_left = libvirt_guest.no_job_left


def assert_all_same(images: dict[str, str], reference: str) -> None:
    for reader, image in images.items():
        try:
            assert_same(image, reference)
        except AssertionError as e:
            raise AssertionError(f"{reader}: {e}") from None


def chain_of(image: str) -> list[dict]:
    return json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", "--backing-chain", image],
        check=True, capture_output=True, text=True).stdout)


def top_layer_data(image: str) -> int:
    """Bytes of data the image itself holds (not its backing files)."""
    extents = json.loads(subprocess.run(
        ["qemu-img", "map", "--output=json", image], check=True,
        capture_output=True, text=True).stdout)
    return sum(e["length"] for e in extents if e["depth"] == 0 and e["data"])


def delete_ticket(daemon, ticket: str) -> None:
    cli(daemon, "ticket", "del", ticket, "--socket", daemon.control_socket)


def wait_for_no_job(guest, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while guest.job_type() != "None":
        assert time.monotonic() < deadline, "the backup job did not end"
        time.sleep(0.2)


def daemon_resources(daemon) -> tuple[int, int]:
    """The daemon's open descriptors and threads."""
    return (len(os.listdir(f"/proc/{daemon.pid}/fd")),
            len(os.listdir(f"/proc/{daemon.pid}/task")))


def assert_no_more_than(daemon, before: tuple[int, int]) -> None:
    """The daemon holds no more descriptors and threads than ``before``
    (once the last clients' connections are closed)."""
    deadline = time.monotonic() + 10
    while any(n > b for n, b in zip(daemon_resources(daemon), before,
                                    strict=True)):
        assert time.monotonic() < deadline, (daemon_resources(daemon),
                                             before)
        time.sleep(0.1)


def test_full_and_two_incrementals(daemon, guest, tmp_path):
    guest.write(0x22, 1 * MiB, 64 * 1024)
    at_full = guest.snapshot("at-full.raw")
    full = backup(daemon, guest, "--full")
    assert full["since"] is None
    vda, vdb = full["disks"]
    assert (vda["name"], vda["size"], vda["dirty"]) == ("vda", SIZE, False)
    assert (vdb["name"], vdb["size"], vdb["dirty"]) == ("vdb", RAW_SIZE, False)
    guest.write(0x33, 2 * MiB, 128 * 1024)  # during the job: not in it
    # The raw disk, backed up in full only.
    for reader, (fetch, unix) in READERS.items():
        image = str(tmp_path / f"vdb-{reader}.raw")
        fetch(daemon, vdb["transfer_url"], image, unix)
        subprocess.run(["cmp", image, guest.raw_disk], check=True)
    # The job serves its other disks until their tickets go too.
    delete_ticket(daemon, vdb["ticket"])
    assert guest.job_type() == "Unbounded"
    fulls = read_backup(daemon, vda, tmp_path, "full")
    assert_all_same(fulls, at_full)
    delete_ticket(daemon, vda["ticket"])
    assert_ended(daemon, guest)
    after_one_job = daemon_resources(daemon)

    # Zeroes over data the full backup holds: the overlay must hide it.
    guest.zero(5 * MiB, 64 * 1024)
    guest.write(0x44, 6 * MiB, 192 * 1024)
    at_inc1 = guest.snapshot("at-inc1.raw")
    inc1 = backup(daemon, guest, "--since", full["checkpoint"])
    [vda] = inc1["disks"]  # vdb is raw: in full backups only
    assert vda["dirty"] and inc1["since"] == full["checkpoint"]
    assert inc1["checkpoint"] > full["checkpoint"]
    # During the job: not in this backup, in the next.
    guest.write(0x55, 6 * MiB, 64 * 1024)
    guest.write(0x56, 10 * MiB, 64 * 1024)
    inc1s = read_backup(daemon, vda, tmp_path, "inc1", backing="full")
    assert_all_same(inc1s, at_inc1)
    cli(daemon, "backup", "stop", guest.name, "--socket",
        daemon.control_socket)
    assert_ended(daemon, guest)

    guest.write(0x66, 3 * MiB, 64 * 1024)
    at_inc2 = guest.snapshot("at-inc2.raw")
    inc2 = backup(daemon, guest, "--since", inc1["checkpoint"])
    [vda] = inc2["disks"]
    guest.write(0x77, 12 * MiB, 64 * 1024)
    inc2s = read_backup(daemon, vda, tmp_path, "inc2", backing="inc1")
    assert_all_same(inc2s, at_inc2)
    # Expired, the ticket ends the job.
    daemon.extend_ticket(vda["ticket"], 1)
    wait_for_no_job(guest)
    assert_ended(daemon, guest)
    daemon.delete_ticket(vda["ticket"])
    assert_no_more_than(daemon, after_one_job)

    assert checkpoints(guest)[-3:] == [
        full["checkpoint"], inc1["checkpoint"], inc2["checkpoint"]]
    for reader, image in inc2s.items():
        assert [os.path.basename(layer["filename"])
                for layer in chain_of(image)] == [
            f"inc2-{reader}.qcow2", f"inc1-{reader}.qcow2",
            f"full-{reader}.qcow2"]
        # An incremental holds what changed, not the disk.
        assert top_layer_data(inc1s[reader]) <= 512 * 1024, reader
        assert top_layer_data(image) <= 512 * 1024, reader


def test_chain_restored_by_the_imageio_client(daemon, guest, tmp_path):
    """ovirt-imageio's client library reads a chain, and writes it back
    to a new disk through a ticket of this daemon."""
    from ovirt_imageio import client

    at_full = guest.snapshot("restore-at-full.raw")
    full = backup(daemon, guest, "--disk", "vda", "--full")
    client.download(full["disks"][0]["transfer_url"],
                    str(tmp_path / "full.qcow2"), daemon.ca_file, fmt="qcow2")
    cli(daemon, "backup", "stop", guest.name, "--socket",
        daemon.control_socket)
    guest.write(0x88, 7 * MiB, 64 * 1024)
    at_inc = guest.snapshot("restore-at-inc.raw")
    inc = backup(daemon, guest, "--since", full["checkpoint"])
    guest.write(0x99, 7 * MiB, 64 * 1024)
    client.download(inc["disks"][0]["transfer_url"],
                    str(tmp_path / "inc.qcow2"), daemon.ca_file, fmt="qcow2",
                    incremental=True, backing_file="full.qcow2",
                    backing_format="qcow2")
    cli(daemon, "backup", "stop", guest.name, "--socket",
        daemon.control_socket)
    assert_same(str(tmp_path / "full.qcow2"), at_full)

    restored = str(tmp_path / "restored.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", restored,
                    str(full["disks"][0]["size"])], check=True)
    ticket = cli(daemon, "ticket", "add", "--ops", "read,write", restored,
                 "--socket", daemon.control_socket).stdout.strip()
    try:
        client.upload(str(tmp_path / "inc.qcow2"),
                      daemon.image_url(ticket), daemon.ca_file)
    finally:
        delete_ticket(daemon, ticket)
    assert_same(restored, at_inc)

