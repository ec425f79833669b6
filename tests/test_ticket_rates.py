"""The rate ``ticket list --watch`` shows: arithmetic on two polls, and
the table it goes in."""

import pytest

from diskferry.cli import ticketwatch
from diskferry.cli.ticketrates import Sample, rate, rates


@pytest.mark.parametrize("before,after,seconds,expected", [
    (0, 1024**2, 1.0, 1024**2),
    (1024**2, 3 * 1024**2, 2.0, 1024**2),
    (4096, 4096, 2.0, 0.0),
    (0, 1000, 0.5, 2000.0),
    (None, 4096, 2.0, None),        # first poll of this ticket
    (4096, None, 2.0, None),        # ticket now read-write: no count
    (8192, 4096, 2.0, None),        # deleted, another added under its id
    (0, 4096, 0.0, None),           # no time between the polls
    (0, 4096, -1.0, None),
])
def test_rate(before, after, seconds, expected):
    assert rate(before, after, seconds) == expected


def info(ticket_id, transferred=None, **extra):
    fields = {"uuid": ticket_id, "ops": ["read"], "size": 1024**3,
              "connections": 1, "idle_time": 0, **extra}
    if transferred is not None:
        fields["transferred"] = transferred
    return fields


def test_rates_of_every_ticket_with_two_readings():
    before = Sample.of([info("a", 0), info("b", 1000), info("rw")], 10.0)
    after = Sample.of([info("a", 2 * 1024**2), info("b", 1000), info("rw"),
                       info("new", 4096)], 12.0)
    assert after.transferred == {"a": 2 * 1024**2, "b": 1000, "new": 4096}
    assert rates(before, after) == {"a": 1024**2, "b": 0.0}
    assert rates(None, after) == {}


def test_frame_has_a_rate_column():
    text = ticketwatch.frame(
        [info("aaaaaaaa-1", 3 * 1024**2), info("bbbbbbbb-2", 0),
         info("cccccccc-3")],
        {"aaaaaaaa-1": 1.5 * 1024**2, "bbbbbbbb-2": 0.0}, full_ids=False)
    lines = text.splitlines()
    assert lines[0].split() == ["ID", "URL", "OPS", "SIZE", "TRANSFERRED",
                                "RATE", "CONNECTIONS", "IDLE", "EXPIRES"]
    assert "3.00 MiB     1.50 MiB/s" in lines[1]
    assert "0 B          0 B/s" in lines[2]
    assert lines[3].split()[5:7] == ["-", "-"]  # TRANSFERRED, RATE
    assert lines[1].startswith("aa...")
    assert ticketwatch.frame([], {}, full_ids=False) == "no tickets"
