"""Shared fixtures: test PKI, real daemons, sparse files and image tickets.

Starting a daemon takes a fraction of a second to a few seconds, so
daemons are shared by the whole session (``daemons`` fixture) and a test
isolates itself with a fresh ticket id and a fresh image file.

Fixtures:

- ``pki``: a session CA and a server certificate for localhost.
- ``daemons``: a pool that starts a daemon per (kind, tls, local socket)
  on first use and stops them all at the end of the session.
- ``server``: parametrized over both kinds (TLS, abstract local socket).
- ``endpoint``: parametrized over both kinds and the three transports a
  client uses for images: TLS over TCP, the abstract UNIX socket and a
  pathname UNIX socket.
- ``make_ticket``: installs an image ticket on a server and removes it at
  teardown; with ``storage`` other than "file", the image is exported by
  a real NBD server and the ticket names the export.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import nbd_servers  # noqa: E402
import servers  # noqa: E402

KINDS = servers.KINDS
TRANSPORTS = ("tls", "abstract", "path")


# --- PKI ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> servers.PKI:
    return servers.make_pki(tmp_path_factory.mktemp("pki"))


# --- daemons -----------------------------------------------------------------


class DaemonPool:
    """Starts each daemon variant once; remembers start failures so that a
    daemon that cannot start fails every test using it quickly."""

    def __init__(self, tmp_path_factory, pki):
        self._tmp = tmp_path_factory
        self._pki = pki
        self._servers: dict[tuple, servers.Server] = {}
        self._failures: dict[tuple, str] = {}

    def get(
        self, kind, *, tls=True, local_socket="abstract", remove_timeout=None
    ) -> servers.Server:
        key = (kind, tls, local_socket, remove_timeout)
        if key in self._failures:
            raise RuntimeError(self._failures[key])
        srv = self._servers.get(key)
        if srv is not None and not srv.alive():
            self._failures[key] = (
                f"{kind} died (exit {srv.proc.returncode}); log:\n"
                f"{srv.log_text()[-4000:]}"
            )
            raise RuntimeError(self._failures[key])
        if srv is None:
            workdir = self._tmp.mktemp(f"{kind}-{'tls' if tls else 'plain'}")
            try:
                srv = servers.start_server(
                    kind,
                    workdir,
                    tls=tls,
                    local_socket=local_socket,
                    pki=self._pki,
                    remove_timeout=remove_timeout,
                )
            except Exception as e:
                self._failures[key] = f"cannot start {kind}: {e}"[-6000:]
                raise
            self._servers[key] = srv
        return srv

    def stop_all(self):
        for srv in self._servers.values():
            srv.stop()
        self._servers.clear()


@pytest.fixture(scope="session")
def daemons(tmp_path_factory, pki):
    pool = DaemonPool(tmp_path_factory, pki)
    yield pool
    pool.stop_all()


@pytest.fixture(params=KINDS)
def server(request, daemons) -> servers.Server:
    return daemons.get(request.param)


Endpoint = servers.Endpoint


@pytest.fixture(
    params=[(k, t) for k in KINDS for t in TRANSPORTS],
    ids=[f"{k}-{t}" for k in KINDS for t in TRANSPORTS],
)
def endpoint(request, daemons) -> Endpoint:
    kind, transport = request.param
    local = "path" if transport == "path" else "abstract"
    return Endpoint(daemons.get(kind, local_socket=local), transport)


# --- images and tickets ------------------------------------------------------


make_sparse_file = servers.make_sparse_file
ticket_dict = servers.ticket_dict


@pytest.fixture
def storage():
    """Where ``make_ticket`` keeps images: "file", or an NBD server kind
    ("qemu-nbd", "nbdkit") exporting the file (tests/conformance runs its
    images tests on every storage)."""
    return "file"


@pytest.fixture
def make_ticket(storage):
    """make_ticket(server, path, size, ops=..., **fields) -> ticket dict.

    The ticket is installed on the server now and deleted at teardown.
    For an NBD storage a fresh NBD server exports ``path`` for the
    ticket's lifetime, and the ticket's URL names the export."""
    added = []
    exports = []

    def make(server, path, size, ops=("read", "write"), **extra):
        t = ticket_dict(path, size, ops, **extra)
        if storage != "file":
            export = nbd_servers.start_export(storage, path)
            exports.append(export)
            t["url"] = export.url
        server.add_ticket(t)
        added.append((server, t["uuid"]))
        return t

    yield make
    for srv, tid in added:
        if srv.alive():
            try:
                srv.control("DELETE", f"/tickets/{tid}", timeout=10)
            except OSError:
                pass
    for export in exports:
        export.stop()
