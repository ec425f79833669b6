import random

import pytest

from diskferry.daemon.ranges import RangeSet


@pytest.mark.parametrize("ranges,expected,total", [
    ([], [], 0),
    ([(0, 10)], [(0, 10)], 10),
    ([(0, 10), (10, 20)], [(0, 20)], 20),
    ([(10, 20), (0, 10)], [(0, 20)], 20),
    ([(0, 10), (5, 15)], [(0, 15)], 15),
    ([(0, 10), (20, 30)], [(0, 10), (20, 30)], 20),
    ([(0, 10), (20, 30), (5, 25)], [(0, 30)], 30),
    ([(0, 100), (20, 30)], [(0, 100)], 100),
    ([(5, 5)], [], 0),
])
def test_add(ranges, expected, total):
    rs = RangeSet()
    for r in ranges:
        rs.add(*r)
    assert list(rs) == expected
    assert rs.total() == total


def test_total_with_extra_does_not_modify():
    rs = RangeSet()
    rs.add(0, 10)
    assert rs.total([(5, 20)]) == 20
    assert list(rs) == [(0, 10)]


def test_random_against_bitmap():
    rnd = random.Random(7)
    rs = RangeSet()
    covered = bytearray(1000)
    for _ in range(300):
        start = rnd.randrange(1000)
        end = min(1000, start + rnd.randrange(50))
        rs.add(start, end)
        covered[start:end] = b"\1" * (end - start)
    assert rs.total() == sum(covered)
    spans = list(rs)
    assert spans == sorted(spans)
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))
