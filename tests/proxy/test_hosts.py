"""Transfers across simulated hosts: three hosts and an engine, each a
network namespace (``netns``) with its own diskferry daemon; the
engine's daemon is the proxy. Six transfers run at once, two per host,
with clients on the image's host, on another host and behind the proxy.

Every daemon listens on the same abstract UNIX address, and every
namespace has the same machine id, so a client on another host that
trusts ``host_id`` alone would reach its own host's daemon through the
socket. That daemon refuses a ticket it does not know, but the engine's
proxy knows the host's ticket ids (it holds a proxy ticket of the same
id, as oVirt's engine installs them): for a client in the engine's
namespace only the ``server_id`` check tells the proxy from the host. A
client uses the UNIX socket exactly when it shares the namespace of the
daemon it talks to, and the proxy, in a namespace of its own, reaches
the hosts over TLS, never probing its own socket.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

import servers
from client.helpers import MiB, data_transports, empty_image, make_image
from diskferry.daemon.pki import ensure_pki

from . import netns

pytestmark = pytest.mark.root

SIZE = 16 * MiB
PORT = 54322
#: The same address in every namespace, each its own abstract namespace.
LOCAL_SOCKET = "\0/diskferry-netns/images"
START_TIMEOUT = 20.0


def start_daemon(ns, workdir, pki):
    workdir.mkdir()
    control = str(workdir / "control.sock")
    argv = servers._diskferry_conf(workdir, pki, True, ns.address, PORT,
                                   LOCAL_SOCKET, control)
    log_path = workdir / "diskferry.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(ns.argv(*argv), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, cwd=workdir,
                                start_new_session=True)
    srv = servers.Server(
        name="diskferry", url_base=f"https://{ns.address}:{PORT}",
        ca_file=pki.ca_file, control_socket=control,
        local_socket=LOCAL_SOCKET, pid=proc.pid, log_path=str(log_path),
        workdir=str(workdir), host=ns.address, port=PORT, tls=True,
        proc=proc)
    # The control socket is a file, reachable from here; the daemon binds
    # its remote and local listeners before it.
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if not srv.alive():
            raise RuntimeError(f"daemon in {ns.name} exited:\n"
                               f"{srv.log_text()}")
        try:
            srv.control("GET", "/tickets/probe", timeout=2)
            return srv
        except OSError:
            if time.monotonic() > deadline:
                srv.stop()
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def datacenter(tmp_path_factory):
    try:
        dc = netns.make(hosts=3)
    except netns.Unavailable as e:
        pytest.skip(f"no simulated hosts: {e}")
    workdir = tmp_path_factory.mktemp("datacenter")
    daemons = {}
    try:
        files = ensure_pki(workdir / "pki", hostnames=["localhost"],
                           ips=[ns.address for ns in [dc.engine, *dc.hosts]])
        pki = servers.PKI(str(files.ca_file), str(files.cert_file),
                          str(files.key_file))
        for ns in [dc.engine, *dc.hosts]:
            daemons[ns.name] = start_daemon(ns, workdir / ns.name, pki)
        yield dc, daemons
    finally:
        for srv in daemons.values():
            srv.stop()
        dc.remove()


def run_client(ns, command, *args):
    proc = subprocess.run(ns.argv(sys.executable, "-m", "diskferry", command,
                                  "--json", *args),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    return summary["transport"], summary["transport_reason"]


def test_transfers_across_hosts(datacenter, tmp_path):
    dc, daemons = datacenter
    h1, h2, h3 = dc.hosts
    engine = dc.engine
    proxy = daemons[engine.name]
    # (image's host, client's namespace, through the proxy); the proxy
    # holds a ticket of the same id for every transfer.
    plan = [
        (h1, h1, False), (h1, h2, False),
        (h2, h2, False), (h2, engine, True),
        (h3, h3, True), (h3, engine, False),
    ]
    transfers = []
    for n, (host, client_ns, proxied) in enumerate(plan):
        srv = daemons[host.name]
        src = tmp_path / f"src{n}.raw"
        content = make_image(src, SIZE, "sparse")
        target = empty_image(tmp_path / f"target{n}.raw", SIZE)
        ticket = servers.ticket_dict(target, SIZE, sparse=True,
                                     transfer_id=f"t{n}")
        srv.add_ticket(ticket)
        url = srv.image_url(ticket["uuid"])
        proxy_ticket = dict(ticket, url=url)
        del proxy_ticket["sparse"]
        proxy.add_ticket(proxy_ticket)
        if proxied:
            url = proxy.image_url(proxy_ticket["uuid"])
        served_by = engine if proxied else host
        transfers.append(dict(
            n=n, host=host, client_ns=client_ns, proxied=proxied, src=src,
            content=content, target=target, ticket=ticket, url=url,
            expected="unix" if client_ns is served_by else "tls",
            out=tmp_path / f"out{n}.raw"))

    results = {}

    def run(t):
        try:
            up = run_client(t["client_ns"], "upload", "--cafile",
                            proxy.ca_file, t["src"], t["url"])
            down = run_client(t["client_ns"], "download", "--cafile",
                              proxy.ca_file, t["url"], t["out"])
            results[t["n"]] = (up, down)
        except BaseException as e:  # reported below, with the others
            results[t["n"]] = e

    threads = [threading.Thread(target=run, args=(t,)) for t in transfers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    proxy_log = proxy.log_text()
    for t in transfers:
        result = results[t["n"]]
        assert not isinstance(result, BaseException), (t["n"], result)
        where = f"transfer {t['n']}: client in {t['client_ns'].name}"
        (up, up_reason), (down, _) = result
        assert (up, down) == (t["expected"], t["expected"]), (where, result)
        if t["client_ns"] is engine and not t["proxied"]:
            assert "reaches another daemon" in up_reason, where
        assert t["target"].read_bytes() == t["content"], where
        assert t["out"].read_bytes() == t["content"], where
        srv = daemons[t["host"].name]
        sides = data_transports(srv, 0, t["ticket"]["uuid"])
        if t["proxied"]:
            # The proxy is on no host of an image: TLS from its address.
            assert sides == {"remote"}, where
            assert f"using tls {t['host'].address}:{PORT}" in proxy_log
        else:
            assert sides == {"local" if t["expected"] == "unix" else
                             "remote"}, where
    # Its own socket has the hosts' address: never taken for theirs.
    assert "using unix socket" not in proxy_log
    assert "this daemon's own" in proxy_log
