"""Timeout and Retry are values: immutable, shareable."""

import pytest

from diskferry.client import Retry, RetryExhausted, Timeout


def test_timeout_is_immutable():
    t = Timeout(connect=1, read=2)
    with pytest.raises(AttributeError):
        t.read = 3
    with pytest.raises(AttributeError):
        Retry().total = 5
    assert Timeout() == Timeout(10.0, 120.0)


def test_retry_counts_without_mutating():
    base = Retry(total=2, backoff_factor=0.5)
    once = base.increment(OSError("a"))
    twice = once.increment(OSError("b"))
    assert base.history == ()
    assert len(once.history) == 1
    assert len(twice.history) == 2
    with pytest.raises(RetryExhausted) as e:
        twice.increment(OSError("c"))
    assert "3 attempts" in str(e.value)
    assert str(e.value.last_error) == "c"


def test_retry_backoff_grows_and_is_capped():
    r = Retry(total=10, backoff_factor=1, backoff_max=3)
    delays = []
    for _ in range(4):
        r = r.increment(OSError())
        delays.append(r.backoff())
    assert delays == [0, 2, 3, 3]


def test_zero_retries_fails_at_once():
    with pytest.raises(RetryExhausted):
        Retry(total=0).increment(OSError())
