"""Choosing the transport: the UNIX socket when local, TLS otherwise."""

import json
import logging
import os
import subprocess
import sys
import uuid

import pytest

from diskferry import client, hostid
from diskferry.client import locality
from servers import start_server

from .helpers import KINDS, MiB, data_transports, empty_image, log_offset


@pytest.fixture(params=KINDS, scope="module")
def unreachable(request, tmp_path_factory, pki):
    """A server whose advertised socket file was removed: unreachable."""
    srv = start_server(request.param, tmp_path_factory.mktemp("unreachable"),
                       local_socket="path", pki=pki)
    os.unlink(srv.local_socket)
    yield srv
    srv.stop()


def test_unreachable_socket_falls_back_to_tls(unreachable, make_ticket,
                                              tmp_path, caplog):
    srv = unreachable
    target = empty_image(tmp_path / "img.raw", MiB)
    ticket = make_ticket(srv, target, MiB)
    url = srv.image_url(ticket["uuid"])

    with caplog.at_level(logging.WARNING, logger="diskferry.client"):
        with client.open(url, "w", cafile=srv.ca_file) as sess:
            sess.write(b"x" * 4096, 0)
            sess.flush()
            assert sess.transport.kind == "tls"
            assert "unusable" in sess.transport_reason
            assert "falling back to tls" in sess.transport_reason
    assert "falling back to tls" in caplog.text
    assert target.read_bytes()[:4096] == b"x" * 4096


def test_unreachable_socket_with_always_fails(unreachable, make_ticket,
                                              tmp_path):
    srv = unreachable
    ticket = make_ticket(srv, empty_image(tmp_path / "img.raw", MiB), MiB)
    with pytest.raises(client.UnixSocketUnavailable, match="cannot use"):
        client.open(srv.image_url(ticket["uuid"]), cafile=srv.ca_file,
                    unix="always")


@pytest.mark.parametrize("kind", KINDS)
def test_auto_uses_socket_and_never_does_not(daemons, make_ticket, tmp_path,
                                             kind):
    srv = daemons.get(kind)
    ticket = make_ticket(srv, empty_image(tmp_path / "img.raw", MiB), MiB)
    url = srv.image_url(ticket["uuid"])
    for unix, kind_used, side in (("auto", "unix", "local"),
                                  ("always", "unix", "local"),
                                  ("never", "tls", "remote")):
        mark = log_offset(srv)
        with client.open(url, cafile=srv.ca_file, unix=unix) as sess:
            assert sess.transport.kind == kind_used
            assert sess.read(0, 4096) == bytes(4096)
        assert data_transports(srv, mark, ticket["uuid"]) == {side}


def test_host_id_decides_locality_with_diskferry(daemons, make_ticket,
                                                 tmp_path):
    srv = daemons.get("diskferry")
    ticket = make_ticket(srv, empty_image(tmp_path / "img.raw", MiB), MiB)
    with client.open(srv.image_url(ticket["uuid"]), cafile=srv.ca_file) as s:
        assert s.options.host_id == hostid.host_id()
        assert s.options.server_id
        assert s.transport_reason == "server is local (host id matches)"


def test_peer_address_decides_locality_with_ovirt_imageio(daemons, make_ticket,
                                                          tmp_path):
    srv = daemons.get("ovirt-imageio")
    ticket = make_ticket(srv, empty_image(tmp_path / "img.raw", MiB), MiB)
    with client.open(srv.image_url(ticket["uuid"]), cafile=srv.ca_file) as s:
        assert s.options.host_id is None
        assert "peer address 127.0.0.1 is ours" in s.transport_reason


def test_own_addresses():
    assert locality.is_own_address("127.0.0.1")
    assert locality.is_own_address("127.0.0.2")
    assert locality.is_own_address("::1")
    assert locality.is_own_address("::ffff:127.0.0.1")
    assert not locality.is_own_address("192.0.2.1")  # TEST-NET-1
    assert not locality.is_own_address("2001:db8::1")
    assert not locality.is_own_address("not-an-address")


def test_host_id_prefers_vdsm_id(tmp_path):
    vdsm = tmp_path / "vdsm.id"
    machine = tmp_path / "machine-id"
    machine.write_text("machine\n")
    files = (str(vdsm), str(machine))
    from_machine = hostid.host_id(files)
    vdsm.write_text("host-uuid\n")
    from_vdsm = hostid.host_id(files)
    assert from_machine and from_vdsm and from_machine != from_vdsm
    # Stable: the same id gives the same value, on either side.
    assert hostid.host_id(files) == from_vdsm
    machine.unlink()
    vdsm.unlink()
    assert hostid.host_id(files) is None


def test_host_id_does_not_reveal_the_id(tmp_path):
    machine = tmp_path / "machine-id"
    raw = "4c4c4544003710568035b3c04f4e4a32"
    machine.write_text(raw + "\n")
    derived = hostid.host_id((str(machine),))
    assert raw not in derived.replace("-", "")
    assert uuid.UUID(derived).version == 4


def test_cli_says_it_falls_back(unreachable, make_ticket, tmp_path):
    srv = unreachable
    ticket = make_ticket(srv, empty_image(tmp_path / "img.raw", MiB), MiB,
                         ops=["read"])
    proc = subprocess.run(
        [sys.executable, "-m", "diskferry", "download", "--json", "--cafile",
         srv.ca_file, srv.image_url(ticket["uuid"]), tmp_path / "out.raw"],
        capture_output=True, text=True, timeout=60, check=True)
    assert "falling back to tls" in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["transport"] == "tls"
    assert "unusable" in summary["transport_reason"]
