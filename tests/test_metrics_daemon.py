"""GET /metrics of a real daemon, read by prometheus_client's parser.

Known transfers over TLS and the local UNIX socket, on file and NBD
(qemu-nbd) tickets, must move the counters by exactly their bytes and
requests; no ticket id may appear anywhere in the output.
"""

from __future__ import annotations

import http.client
import os
import socket
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

import nbd_servers
from diskferry.daemon import config as daemon_config
from diskferry.daemon.metrics.exposition import CONTENT_TYPE
from diskferry.daemon.service import Daemon
from servers import free_port, make_sparse_file, start_server, ticket_dict

MiB = 1 << 20
SIZE = 8 * MiB


class Scrape:
    """One scrape's samples, by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in
                         text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` whose labels include
        ``labels`` (0 when none)."""
        return sum(s.value for s in self.samples if s.name == name and
                   labels.items() <= s.labels.items())


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, pki):
    workdir = tmp_path_factory.mktemp("metrics")
    port = free_port()
    srv = start_server("diskferry", workdir, pki=pki, sections={
        "metrics": {"enable": True, "port": port, "transfer_labels": True}})
    srv.metrics_port = port
    yield srv
    srv.stop()


def scrape(srv) -> Scrape:
    deadline = time.monotonic() + 10
    while True:
        status, headers, body = srv.control("GET", "/metrics")
        # 503: a daemon capped at one connection per service is still
        # closing the control connection of the last scrape.
        if status != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE
    return Scrape(body.decode("utf-8"))


def scrape_after(srv, before: Scrape, requests: int, **labels) -> Scrape:
    """A scrape once ``requests`` more requests matching ``labels`` were
    counted: a server counts a request just after its client read the
    answer."""
    deadline = time.monotonic() + 10
    while True:
        got = scrape(srv)
        done = (got.value("diskferry_requests_total", **labels) -
                before.value("diskferry_requests_total", **labels))
        if done >= requests or time.monotonic() > deadline:
            return got
        time.sleep(0.01)


def connect(srv, transport):
    if transport == "tls":
        return srv.remote_connection()
    return srv.local_connection()


def request(con, method, path, body=None, headers=None):
    con.request(method, path, body=body, headers=headers or {})
    res = con.getresponse()
    return res.status, res.read()


@pytest.fixture
def image(tmp_path):
    return make_sparse_file(tmp_path / "disk.raw", SIZE,
                            {0: b"x" * MiB, 5 * MiB: b"y" * 4096})


def add_ticket(srv, url_or_path, **extra):
    t = ticket_dict(url_or_path, SIZE, **extra)
    srv.add_ticket(t)
    return t


def test_control_socket_serves_the_text_format(daemon):
    got = scrape(daemon)
    for family in got.families.values():
        assert family.documentation, family.name
        assert family.type in ("counter", "gauge", "histogram")
    assert got.value("diskferry_build_info") == 1
    assert got.value("diskferry_start_time_seconds") > 0
    assert got.value("process_open_fds") > 0
    assert got.value("diskferry_threads") > 0
    assert "# TYPE diskferry_requests_total counter" in got.text


def test_metrics_port_serves_the_text_format(daemon):
    con = http.client.HTTPConnection("localhost", daemon.metrics_port,
                                     timeout=10)
    try:
        con.request("GET", "/metrics")
        res = con.getresponse()
        body = res.read().decode()
        assert res.status == 200
        assert res.getheader("Content-Type") == CONTENT_TYPE
    finally:
        con.close()
    assert Scrape(body).value("diskferry_build_info") == 1


def test_metrics_port_serves_nothing_else(daemon):
    con = http.client.HTTPConnection("localhost", daemon.metrics_port,
                                     timeout=10)
    try:
        assert request(con, "GET", "/tickets/")[0] == 404
    finally:
        con.close()


@pytest.mark.parametrize("transport", ["tls", "unix"])
def test_transfer_moves_counters_by_its_bytes(daemon, image, transport):
    t = add_ticket(daemon, image)
    service = "remote" if transport == "tls" else "local"
    put_size, get_size = 3 * MiB + 5, 2 * MiB + 7
    before = scrape(daemon)
    con = connect(daemon, transport)
    try:
        status, _ = request(
            con, "PUT", f"/images/{t['uuid']}", b"z" * put_size,
            {"Content-Range": f"bytes 0-{put_size - 1}/*"})
        assert status == 200
        status, data = request(con, "GET", f"/images/{t['uuid']}", None,
                               {"Range": f"bytes=0-{get_size - 1}"})
        assert status == 206 and len(data) == get_size
    finally:
        con.close()
    after = scrape_after(daemon, before, 2, service=service)

    def delta(name, **labels):
        return after.value(name, **labels) - before.value(name, **labels)

    assert delta("diskferry_written_bytes_total", transport=transport,
                 backend="file") == put_size
    assert delta("diskferry_read_bytes_total", transport=transport,
                 backend="file") == get_size
    for method in ("PUT", "GET"):
        assert delta("diskferry_requests_total", service=service,
                     method=method, code="2xx") == 1
        assert delta("diskferry_request_duration_seconds_count",
                     service=service, method=method) == 1
        assert delta("diskferry_request_duration_seconds_bucket",
                     service=service, method=method, le="+Inf") == 1
    assert delta("diskferry_connections_total", service=service) == 1


@pytest.mark.parametrize("transport", ["tls", "unix"])
def test_refused_request_counted_by_status_class(daemon, transport):
    service = "remote" if transport == "tls" else "local"
    before = scrape(daemon)
    con = connect(daemon, transport)
    try:
        assert request(con, "GET", f"/images/{uuid.uuid4()}")[0] == 403
    finally:
        con.close()
    labels = {"service": service, "method": "GET"}
    after = scrape_after(daemon, before, 1, **labels)
    assert (after.value("diskferry_requests_total", code="4xx", **labels) -
            before.value("diskferry_requests_total", code="4xx", **labels)
            ) == 1
    assert (after.value("diskferry_requests_total", code="2xx", **labels) ==
            before.value("diskferry_requests_total", code="2xx", **labels))
    assert (after.value("diskferry_read_bytes_total") ==
            before.value("diskferry_read_bytes_total"))


def test_unknown_method_has_a_bounded_label(daemon):
    labels = {"service": "local", "method": "other", "code": "5xx"}
    before = scrape(daemon)
    con = daemon.local_connection()
    try:
        assert request(con, "BREW", "/images/x")[0] == 501
    finally:
        con.close()
    after = scrape_after(daemon, before, 1, **labels)
    assert (after.value("diskferry_requests_total", **labels) -
            before.value("diskferry_requests_total", **labels)) == 1
    assert "BREW" not in after.text


def test_nbd_ticket_counted(daemon, image):
    export = nbd_servers.start_export("qemu-nbd", image)
    try:
        t = add_ticket(daemon, "/unused", url=export.url)
        before = scrape(daemon)
        con = daemon.local_connection()
        try:
            status, data = request(con, "GET", f"/images/{t['uuid']}", None,
                                   {"Range": f"bytes=0-{MiB - 1}"})
            assert status == 206 and data == b"x" * MiB
            during = scrape_after(daemon, before, 1, service="local")
        finally:
            con.close()
        daemon.delete_ticket(t["uuid"])
    finally:
        export.stop()
    assert (during.value("diskferry_read_bytes_total", transport="unix",
                         backend="nbd") -
            before.value("diskferry_read_bytes_total", transport="unix",
                         backend="nbd")) == MiB
    for name in ("diskferry_nbd_connects_total",
                 "diskferry_nbd_exports_connected"):
        assert during.value(name) - before.value(name) == 1
    # The client closed its connection: its NBD connection closes too.
    deadline = time.monotonic() + 10
    while (scrape(daemon).value("diskferry_nbd_exports_connected") !=
           before.value("diskferry_nbd_exports_connected")):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_unreachable_nbd_export_counted(daemon, tmp_path):
    t = add_ticket(daemon, "/unused",
                   url=f"nbd:unix:{tmp_path}/nothing.sock")
    before = scrape(daemon)
    con = daemon.remote_connection()
    try:
        assert request(con, "OPTIONS", f"/images/{t['uuid']}")[0] == 500
    finally:
        con.close()
    after = scrape_after(daemon, before, 1, service="remote", code="5xx")
    assert (after.value("diskferry_nbd_errors_total") -
            before.value("diskferry_nbd_errors_total")) == 1
    assert (after.value("diskferry_nbd_connects_total") ==
            before.value("diskferry_nbd_connects_total"))


def test_proxy_ticket_counted(daemon, image):
    upstream = add_ticket(daemon, image, ops=["read"])
    proxied = add_ticket(daemon, "/unused", ops=["read"],
                         url=daemon.image_url(upstream["uuid"]))
    before = scrape(daemon)
    con = daemon.local_connection()
    try:
        status, data = request(con, "GET", f"/images/{proxied['uuid']}",
                               None, {"Range": f"bytes=0-{MiB - 1}"})
        assert status == 206 and data == b"x" * MiB
    finally:
        con.close()
    after = scrape_after(daemon, before, 1, service="local", code="2xx")
    assert (after.value("diskferry_read_bytes_total", transport="unix",
                        backend="http") -
            before.value("diskferry_read_bytes_total", transport="unix",
                         backend="http")) == MiB
    # The proxy's own GETs upstream, over TLS to this same daemon: the
    # range, and what it asks to learn the image's size.
    assert (after.value("diskferry_upstream_requests_total") -
            before.value("diskferry_upstream_requests_total")) >= 1
    assert (after.value("diskferry_read_bytes_total", transport="tls",
                        backend="file") -
            before.value("diskferry_read_bytes_total", transport="tls",
                         backend="file")) >= MiB
    assert (after.value("diskferry_upstream_errors_total") ==
            before.value("diskferry_upstream_errors_total"))


def test_tickets_and_transfers(daemon, image):
    before = scrape(daemon)
    read = add_ticket(daemon, image, ops=["read"])
    add_ticket(daemon, image, ops=["read", "write"])
    con = daemon.local_connection()
    try:
        assert request(con, "OPTIONS", f"/images/{read['uuid']}")[0] == 200
        during = scrape(daemon)
    finally:
        con.close()
    assert (during.value("diskferry_tickets", ops="read") -
            before.value("diskferry_tickets", ops="read")) == 1
    assert (during.value("diskferry_tickets", ops="read,write") -
            before.value("diskferry_tickets", ops="read,write")) == 1
    assert (during.value("diskferry_transfers", state="active") -
            before.value("diskferry_transfers", state="active")) == 1
    assert during.value("diskferry_transfer_idle_seconds_max") >= 0


def test_no_ticket_id_anywhere(daemon, image):
    named = add_ticket(daemon, image, ops=["read"], transfer_id="backup-7")
    anonymous = add_ticket(daemon, image, ops=["read"])
    before = scrape(daemon)
    for t in (named, anonymous):
        con = daemon.local_connection()
        try:
            request(con, "GET", f"/images/{t['uuid']}", None,
                    {"Range": "bytes=0-4095"})
        finally:
            con.close()
    got = scrape_after(daemon, before, 2, service="local", code="2xx")
    for t in (named, anonymous):
        assert t["uuid"] not in got.text
        assert t["uuid"][:8] not in got.text
    assert "(ticket/" not in got.text
    assert got.value("diskferry_transfer_bytes",
                     transfer_id="backup-7") == 4096
    ids = {s.labels.get("transfer_id") for s in got.samples} - {None}
    assert ids == {"backup-7"}


def hold_the_only_connection(srv):
    """A local connection that was served: the cap of one is reached
    (once the daemon's own readiness probe was let go)."""
    deadline = time.monotonic() + 10
    while True:
        held = srv.raw_local_socket()
        try:
            held.sendall(b"GET /info/ HTTP/1.1\r\nHost: x\r\n\r\n")
            if held.recv(4096).startswith(b"HTTP/1.1 200"):
                return held
        except OSError:
            pass  # refused and closed already
        held.close()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_connection_refused_by_the_cap_counted(tmp_path, pki):
    srv = start_server("diskferry", tmp_path, pki=pki,
                       daemon_options={"connection_limit": 1})
    try:
        held = hold_the_only_connection(srv)
        try:
            before = scrape(srv)
            # Refused at once, before it could send anything.
            with srv.raw_local_socket() as refused:
                assert refused.recv(4096).startswith(b"HTTP/1.1 503")
            after = scrape(srv)
        finally:
            held.close()
    finally:
        srv.stop()
    assert (after.value("diskferry_connections_refused_total",
                        service="local") -
            before.value("diskferry_connections_refused_total",
                         service="local")) == 1
    assert after.value("diskferry_connections_open", service="local") == 1
    assert after.value("diskferry_connections_open", service="control") == 1


# The metrics port, in a daemon started in this process


def in_process_config(tmp_path, **metrics):
    cfg = daemon_config.Config()
    cfg.daemon.run_dir = str(tmp_path / "run")
    cfg.daemon.state_dir = str(tmp_path / "state")
    cfg.tls.enable = False
    cfg.remote.port = 0
    cfg.local.enable = False
    for key, value in metrics.items():
        setattr(cfg.metrics, key, value)
    return cfg


def test_metrics_port_off_by_default(tmp_path):
    assert daemon_config.Config().metrics.enable is False
    d = Daemon(in_process_config(tmp_path))
    d.start()
    try:
        assert d.server("metrics") is None
        assert [s.name for s in d.servers] == ["remote", "control"]
    finally:
        d.stop()


def test_metrics_port_bound_to_localhost_when_on(tmp_path):
    d = Daemon(in_process_config(tmp_path, enable=True, port=0))
    d.start()
    try:
        metrics = d.server("metrics")
        assert metrics is not None
        host = metrics.sock.getsockname()[0]
        assert host in ("127.0.0.1", "::1")
        assert any("metrics:" in line for line in d.describe())
    finally:
        d.stop()


def test_metrics_port_listens_where_configured(tmp_path):
    d = Daemon(in_process_config(tmp_path, enable=True, port=0,
                                 host="0.0.0.0"))
    d.start()
    try:
        sock = d.server("metrics").sock
        assert sock.getsockname()[0] == "0.0.0.0"
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
                      b"Connection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200")
    finally:
        d.stop()


def test_metrics_port_checked(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[metrics]\nport = 70000\n")
    with pytest.raises(daemon_config.ConfigError, match=r"\[metrics\] port"):
        daemon_config.load(path)
    assert os.path.exists(path)
