"""Fixtures for proxy tests: proxies in front of real daemons.

A proxy is a daemon whose ticket URL is another daemon's transfer URL.
The daemons behind it (``upstream``) come from the session's pool; the
proxies are daemons of their own, so that each log shows one side:

- ``upstream(name)``: "diskferry" (local socket on: a proxy on this host
  reaches it over its UNIX socket), "diskferry-tls" (no local socket:
  only over TLS), "diskferry-http" (no TLS either), "ovirt-imageio".
- ``proxies(kind)``: a diskferry or ovirt-imageio daemon used as the proxy.
- ``relay``: the client tests' connection-cutting relay; ``backup_disk``:
  the NBD tests' qcow2 with a bitmap and writes after it.
- ``route(proxy_kind, upstream_name, path, size, ops, ...)``: a ticket on
  the upstream over ``path``, a proxy ticket in front of it (``via`` a
  relay, if given), both removed at teardown.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

import servers
from client.conftest import relay  # noqa: F401 -- fixtures for tests here
from test_nbd_tickets import backup_disk  # noqa: F401

#: name -> (kind, local socket, TLS)
UPSTREAMS = {
    "diskferry": ("diskferry", "abstract", True),
    "diskferry-tls": ("diskferry", None, True),
    "diskferry-http": ("diskferry", None, False),
    "ovirt-imageio": ("ovirt-imageio", "abstract", True),
}


@pytest.fixture
def upstream(daemons):
    def get(name):
        kind, local, tls = UPSTREAMS[name]
        return daemons.get(kind, local_socket=local, tls=tls)
    return get


@pytest.fixture(scope="session")
def proxies(tmp_path_factory, pki):
    started: dict[str, servers.Server] = {}

    def get(kind):
        if kind not in started:
            workdir = tmp_path_factory.mktemp(f"proxy-{kind}")
            started[kind] = servers.start_server(kind, workdir, pki=pki)
        return started[kind]

    yield get
    for srv in started.values():
        srv.stop()


def upstream_url(up, ticket_id, via=None):
    """The upstream's transfer URL, or the same through ``via``, a
    (host, port) that forwards to it (a relay)."""
    if via is None:
        return up.image_url(ticket_id)
    scheme = "https" if up.tls else "http"
    return f"{scheme}://{via[0]}:{via[1]}/images/{ticket_id}"


@dataclass
class Route:
    """A proxy ticket in front of an upstream ticket."""

    proxy: servers.Server
    upstream: servers.Server
    ticket: dict
    upstream_ticket: dict
    #: The upstream ticket's transfer_id: marks its lines in the upstream log.
    marker: str

    @property
    def url(self) -> str:
        return self.proxy.image_url(self.ticket["uuid"])

    @property
    def upstream_url(self) -> str:
        return self.upstream.image_url(self.upstream_ticket["uuid"])


@pytest.fixture
def route(upstream, proxies):
    made = []

    def make(proxy_kind, upstream_name, path: Path, size, ops=("read", "write"),
             upstream_ops=None, via=None, **upstream_fields):
        up = upstream(upstream_name)
        marker = f"proxied-{uuid.uuid4().hex[:12]}"
        up_ticket = servers.ticket_dict(path, size, upstream_ops or ops,
                                        transfer_id=marker, **upstream_fields)
        up.add_ticket(up_ticket)
        made.append((up, up_ticket["uuid"]))
        px = proxies(proxy_kind)
        ticket = {
            "uuid": str(uuid.uuid4()),
            "size": size,
            "url": upstream_url(up, up_ticket["uuid"], via),
            "ops": list(ops),
            "timeout": 300,
            "transfer_id": f"proxy-{marker}",
        }
        px.add_ticket(ticket)
        made.append((px, ticket["uuid"]))
        return Route(px, up, ticket, up_ticket, marker)

    yield make
    for srv, tid in made:
        if srv.alive():
            srv.control("DELETE", f"/tickets/{tid}", timeout=10)
