"""The daemon's families, fed directly: what is counted and what never
appears."""

import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from diskferry.daemon.http.parse import RequestHead
from diskferry.daemon.http.request import AccessRecord
from diskferry.daemon.metrics.events import BackendEvents
from diskferry.daemon.metrics.registry import DaemonMetrics, MetricsSettings
from diskferry.daemon.tickets import TicketStore


def head(method):
    return RequestHead(method, "/images/x", "HTTP/1.1", "/images/x", {})


def values(metrics):
    text = metrics.render().decode()
    samples = [s for f in text_string_to_metric_families(text)
               for s in f.samples]
    return text, samples


def value(samples, name, **labels):
    return sum(s.value for s in samples
               if s.name == name and labels.items() <= s.labels.items())


@pytest.fixture
def store():
    return TicketStore(lambda url: None)


def add(store, **extra):
    ticket = {"uuid": str(uuid.uuid4()), "size": 4096, "ops": ["read"],
              "url": "file:///var/tmp/x.raw", "timeout": 300, **extra}
    store.add(ticket)
    return ticket


@pytest.mark.parametrize("method, status, family, counted", [
    ("GET", 206, "diskferry_read_bytes_total", 1000),
    ("GET", 200, "diskferry_read_bytes_total", 1000),
    ("PUT", 200, "diskferry_written_bytes_total", 1000),
    ("PATCH", 200, "diskferry_zeroed_bytes_total", 1000),
    ("GET", 416, "diskferry_read_bytes_total", 0),
    ("PUT", 507, "diskferry_written_bytes_total", 0),
    ("PUT", None, "diskferry_written_bytes_total", 0),
])
def test_bytes_of_successful_requests(store, method, status, family,
                                      counted):
    metrics = DaemonMetrics(store, events=BackendEvents())
    service = metrics.service("local", "unix")
    record = AccessRecord(transfer_id="t", offset=0, size=1000,
                          scheme="file")
    service.request_done(head(method), status, record, 0.5)
    _, samples = values(metrics)
    assert value(samples, family, transport="unix", backend="file") == counted
    code = f"{status // 100}xx" if status else "none"
    assert value(samples, "diskferry_requests_total", service="local",
                 method=method, code=code) == 1


@pytest.mark.parametrize("scheme, backend", [
    ("file", "file"), ("nbd", "nbd"), ("nbd+unix", "nbd"),
    ("https", "http"), ("http", "http"), ("memory", "other")])
def test_backend_label_from_the_ticket_url(store, scheme, backend):
    metrics = DaemonMetrics(store, events=BackendEvents())
    metrics.service("remote", "tls").request_done(
        head("GET"), 200, AccessRecord(size=7, scheme=scheme), 0.1)
    _, samples = values(metrics)
    assert value(samples, "diskferry_read_bytes_total", transport="tls",
                 backend=backend) == 7


def test_unparsed_request_counted(store):
    metrics = DaemonMetrics(store, events=BackendEvents())
    metrics.service("remote", "tls").request_done(None, 400, AccessRecord(),
                                                  0.0)
    _, samples = values(metrics)
    assert value(samples, "diskferry_requests_total", method="none",
                 code="4xx") == 1
    assert value(samples, "diskferry_request_duration_seconds_count") == 0


def test_connections_by_service(store):
    metrics = DaemonMetrics(store, events=BackendEvents())
    local = metrics.service("local", "unix")
    for _ in range(3):
        local.connection_opened()
    local.connection_closed()
    local.connection_refused()
    _, samples = values(metrics)
    assert value(samples, "diskferry_connections_open", service="local") == 2
    assert value(samples, "diskferry_connections_total", service="local") == 3
    assert value(samples, "diskferry_connections_refused_total",
                 service="local") == 1


def test_no_transfer_labels_unless_configured(store):
    named = add(store, transfer_id="backup-1")
    anonymous = add(store, ops=["read", "write"])
    text, samples = values(DaemonMetrics(store, events=BackendEvents()))
    assert "transfer_id=" not in text and "backup-1" not in text
    for t in (named, anonymous):
        assert t["uuid"] not in text and t["uuid"][:18] not in text
    assert value(samples, "diskferry_tickets", ops="read") == 1
    assert value(samples, "diskferry_tickets", ops="read,write") == 1
    assert value(samples, "diskferry_transfers", state="idle") == 2
    assert value(samples, "diskferry_transfers", state="active") == 0


def test_transfer_labels_name_only_given_transfer_ids(store):
    named = add(store, transfer_id='we"ird\nid')
    anonymous = add(store)
    metrics = DaemonMetrics(store, MetricsSettings(transfer_labels=True),
                            events=BackendEvents())
    text, samples = values(metrics)
    assert named["uuid"] not in text and anonymous["uuid"] not in text
    assert {s.labels["transfer_id"] for s in samples
            if "transfer_id" in s.labels} == {'we"ird\nid'}
    assert value(samples, "diskferry_transfer_connections",
                 transfer_id='we"ird\nid') == 0


def test_backend_events(store):
    events = BackendEvents()
    events.nbd_connected()
    events.nbd_connected()
    events.nbd_disconnected()
    events.nbd_failed()
    events.upstream_request()
    events.upstream_failed()
    _, samples = values(DaemonMetrics(store, events=events))
    assert value(samples, "diskferry_nbd_exports_connected") == 1
    assert value(samples, "diskferry_nbd_connects_total") == 2
    assert value(samples, "diskferry_nbd_errors_total") == 1
    assert value(samples, "diskferry_upstream_requests_total") == 1
    assert value(samples, "diskferry_upstream_errors_total") == 1


def test_every_family_is_described(store):
    text, _ = values(DaemonMetrics(store,
                                   MetricsSettings(transfer_labels=True)))
    names = [line.split()[2] for line in text.splitlines()
             if line.startswith("# TYPE")]
    assert len(names) == len(set(names))
    helps = [line.split()[2] for line in text.splitlines()
             if line.startswith("# HELP")]
    assert helps == names
    families = {f.name for f in text_string_to_metric_families(text)}
    assert len(families) == len(names)
