"""The text exposition format, read back by prometheus_client's parser."""

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from diskferry.daemon.metrics.exposition import (
    CONTENT_TYPE,
    Counter,
    Gauge,
    Histogram,
    format_value,
    render,
)


def parse(text: bytes):
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def samples(family):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for s in family.samples}


def test_content_type_is_what_scrapers_expect():
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_counter_by_labels():
    c = Counter("x_requests_total", "Requests.", ("method", "code"))
    c.inc(("GET", "2xx"))
    c.inc(("GET", "2xx"), 2)
    c.inc(("PUT", "4xx"))
    families = parse(render([c.snapshot()]))
    family = families["x_requests"]
    assert family.type == "counter"
    assert family.documentation == "Requests."
    assert samples(family) == {
        ("x_requests_total", (("code", "2xx"), ("method", "GET"))): 3,
        ("x_requests_total", (("code", "4xx"), ("method", "PUT"))): 1,
    }


def test_help_and_type_lines_come_first():
    g = Gauge("x_open", "Open.\nThings.", ())
    g.set((), 5)
    assert render([g.snapshot()]).decode().splitlines() == [
        "# HELP x_open Open.\\nThings.",
        "# TYPE x_open gauge",
        "x_open 5",
    ]


@pytest.mark.parametrize("value", [
    'quote " here', "back\\slash", "new\nline", "ünïcode", "", "a,b=c}"])
def test_label_values_escaped(value):
    g = Gauge("x_info", "Info.", ("name",))
    g.set((value,), 1)
    family = parse(render([g.snapshot()]))["x_info"]
    assert [s.labels for s in family.samples] == [{"name": value}]


def test_gauge_goes_both_ways():
    g = Gauge("x_connections", "Connections.", ("service",))
    g.inc(("local",))
    g.inc(("local",))
    g.inc(("local",), -1)
    assert g.value(("local",)) == 1


def test_histogram_buckets_sum_and_count():
    h = Histogram("x_duration_seconds", "Duration.", ("method",),
                  (0.1, 1.0, 10.0))
    for value in (0.05, 0.1, 0.5, 20.0):
        h.observe(("GET",), value)
    family = parse(render([h.snapshot()]))["x_duration_seconds"]
    assert family.type == "histogram"
    got = samples(family)
    get = ("method", "GET")
    assert got[("x_duration_seconds_bucket", (("le", "0.1"), get))] == 2
    assert got[("x_duration_seconds_bucket", (("le", "1"), get))] == 3
    assert got[("x_duration_seconds_bucket", (("le", "10"), get))] == 3
    assert got[("x_duration_seconds_bucket", (("le", "+Inf"), get))] == 4
    assert got[("x_duration_seconds_count", (get,))] == 4
    assert got[("x_duration_seconds_sum", (get,))] == pytest.approx(20.65)


@pytest.mark.parametrize("value, text", [
    (0, "0"), (7, "7"), (2.0, "2"), (0.25, "0.25"), (2**60, str(2**60)),
    (math.inf, "+Inf"), (-math.inf, "-Inf"), (math.nan, "NaN")])
def test_values(value, text):
    assert format_value(value) == text


def test_large_byte_counts_stay_exact():
    c = Counter("x_bytes_total", "Bytes.")
    c.inc((), 2**53 + 1)
    text = render([c.snapshot()]).decode()
    assert f"x_bytes_total {2**53 + 1}" in text.splitlines()
