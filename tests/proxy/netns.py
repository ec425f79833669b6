"""A simulated data center on one machine: network namespaces as hosts.

Each "host" (and the "engine") is a network namespace made for the test
and removed after it. They share one layer-2 segment, a bridge in the
engine's namespace with a veth pair to each host, on 169.254.10.0/24
(link-local: no route leads out, and no address outside the namespaces
changes). Files are shared, as on hosts that share storage; what differs
per namespace is the network, including abstract UNIX socket addresses,
while ``/etc/machine-id`` (hence the daemons' ``host_id``) is the same in
all of them: only the ``server_id`` confirmation over the socket tells a
daemon on this "host" from one on another.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass, field

SUBNET = "169.254.10"
ENGINE_ADDRESS = f"{SUBNET}.100"


class Unavailable(Exception):
    """Raised when namespaces cannot be made here; the message says why."""


def _ip(*args):
    try:
        subprocess.run(["ip", *args], check=True, capture_output=True,
                       text=True, timeout=30)
    except FileNotFoundError as e:
        raise Unavailable("no ip command (iproute2)") from e
    except subprocess.CalledProcessError as e:
        raise Unavailable(f"ip {' '.join(args)}: {e.stderr.strip()}") from e


@dataclass
class Namespace:
    name: str
    address: str

    def argv(self, *command) -> list[str]:
        """``command`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *map(str, command)]


@dataclass
class DataCenter:
    engine: Namespace
    hosts: list[Namespace]
    _made: list[str] = field(default_factory=list)

    def remove(self):
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True,
                           timeout=30)
        self._made.clear()


def make(hosts: int) -> DataCenter:
    """Namespaces for ``hosts`` hosts and an engine, linked by a bridge."""
    if os.geteuid() != 0:
        raise Unavailable("network namespaces need root")
    tag = uuid.uuid4().hex[:6]
    dc = DataCenter(Namespace(f"df-engine-{tag}", ENGINE_ADDRESS),
                    [Namespace(f"df-host{i}-{tag}", f"{SUBNET}.{i}")
                     for i in range(1, hosts + 1)])
    try:
        for ns in [dc.engine, *dc.hosts]:
            _ip("netns", "add", ns.name)
            dc._made.append(ns.name)
            _ip("-n", ns.name, "link", "set", "lo", "up")
        e = dc.engine.name
        _ip("-n", e, "link", "add", "br0", "type", "bridge")
        _ip("-n", e, "addr", "add", f"{ENGINE_ADDRESS}/24", "dev", "br0")
        _ip("-n", e, "link", "set", "br0", "up")
        for i, host in enumerate(dc.hosts, 1):
            _ip("link", "add", "name", "eth0", "netns", host.name,
                "type", "veth", "peer", "name", f"port{i}", "netns", e)
            _ip("-n", e, "link", "set", f"port{i}", "master", "br0", "up")
            _ip("-n", host.name, "addr", "add", f"{host.address}/24",
                "dev", "eth0")
            _ip("-n", host.name, "link", "set", "eth0", "up")
    except BaseException:
        dc.remove()
        raise
    return dc
