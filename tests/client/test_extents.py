"""Extent arithmetic and local file mapping, as tables."""

import pytest

from diskferry.client import extents
from diskferry.client.engine import Piece, plan
from diskferry.client.errors import ProtocolError
from diskferry.extent import Extent, split

from .helpers import MiB


@pytest.mark.parametrize("wanted, known, expected", [
    ([], [(0, 10)], []),
    ([(0, 10)], [], [(0, 10)]),
    ([(0, 10)], [(0, 10)], []),
    ([(0, 10)], [(2, 4)], [(0, 2), (4, 10)]),
    ([(0, 10)], [(5, 20)], [(0, 5)]),
    ([(5, 10)], [(0, 6), (8, 9)], [(6, 8), (9, 10)]),
    ([(0, 4), (6, 10)], [(3, 7)], [(0, 3), (7, 10)]),
    ([(0, 4), (6, 10)], [(10, 12)], [(0, 4), (6, 10)]),
])
def test_subtract(wanted, known, expected):
    assert extents.subtract(wanted, known) == expected


@pytest.mark.parametrize("start, end, step, expected", [
    (0, 0, 4, []),
    (0, 4, 4, [(0, 4)]),
    (0, 10, 4, [(0, 4), (4, 4), (8, 2)]),
    (3, 5, 4, [(3, 2)]),
])
def test_split(start, end, step, expected):
    assert list(split(start, end, step)) == expected


def test_ranges_merge_adjacent():
    exts = [Extent(0, 2, True), Extent(2, 3, True, True), Extent(5, 1, False),
            Extent(6, 2, True)]
    assert extents.ranges(exts, zero=True) == [(0, 5), (6, 8)]
    assert extents.ranges(exts, zero=False) == [(5, 6)]


def test_parse_extents():
    got = extents.parse_extents([
        {"start": 0, "length": 4, "zero": False, "hole": False},
        {"start": 4, "length": 4, "zero": True, "hole": True},
    ], size=8)
    assert got == [Extent(0, 4, False), Extent(4, 4, True, True)]


@pytest.mark.parametrize("items, size", [
    ([{"start": 0, "length": 4, "zero": False},
      {"start": 5, "length": 3, "zero": True}], 8),
    ([{"start": 0, "length": 4, "zero": False}], 8),
    ([{"start": 0, "zero": False}], 8),
])
def test_parse_extents_rejects_bad_answers(items, size):
    with pytest.raises(ProtocolError):
        extents.parse_extents(items, size=size)


def test_file_extents_finds_holes(tmp_path):
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(2 * MiB)
        f.write(b"x" * MiB)
    with open(path, "rb") as f:
        got = extents.file_extents(f.fileno(), 8 * MiB)
    assert got == [Extent(0, 2 * MiB, True, True),
                   Extent(2 * MiB, MiB, False),
                   Extent(3 * MiB, 5 * MiB, True, True)]


def test_file_extents_of_empty_and_full_files(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "full").write_bytes(b"x" * 4096)
    with open(tmp_path / "empty", "rb") as f:
        assert extents.file_extents(f.fileno(), 0) == []
    with open(tmp_path / "full", "rb") as f:
        assert extents.file_extents(f.fileno(), 4096) == [
            Extent(0, 4096, False)]


def test_plan_cuts_data_and_keeps_order():
    exts = [Extent(0, 10, False), Extent(10, 5, True), Extent(15, 3, False)]
    assert list(plan(exts, 4)) == [
        Piece("data", 0, 4), Piece("data", 4, 4), Piece("data", 8, 2),
        Piece("zero", 10, 5), Piece("data", 15, 3)]
    assert list(plan(exts, 4, zero_ranges=[])) == [
        Piece("data", 0, 4), Piece("data", 4, 4), Piece("data", 8, 2),
        Piece("data", 15, 3)]


def test_plan_merges_given_zero_ranges_in_order():
    exts = [Extent(0, 10, False), Extent(10, 8, True)]
    assert list(plan(exts, 8, zero_ranges=[(12, 18)])) == [
        Piece("data", 0, 8), Piece("data", 8, 2), Piece("zero", 12, 6)]


@pytest.mark.parametrize("known,start,end,expected", [
    ([], 0, 1, False),
    ([(0, 10)], 0, 10, True),
    ([(0, 10)], 5, 11, False),
    ([(0, 10), (20, 30)], 21, 30, True),
    ([(0, 10), (20, 30)], 9, 21, False),
    ([(0, 10), (20, 30)], 10, 20, False),
])
def test_covered(known, start, end, expected):
    assert extents.covered(known, start, end) is expected


K = 1024


def _buffer(length, data_at=()):
    buf = bytearray(length)
    for offset in data_at:
        buf[offset] = 1
    return buf


@pytest.mark.parametrize("length,data_at,min_run,expected", [
    # All zero: one zero run, whatever its length.
    (192 * K, (), MiB, [(0, 192 * K, True)]),
    # All data.
    (128 * K, (0, 64 * K), 64 * K, [(0, 128 * K, False)]),
    # A zero run long enough between data.
    (4 * MiB, (0, 3 * MiB + 5), MiB,
     [(0, 64 * K, False), (64 * K, 3 * MiB, True), (3 * MiB, 4 * MiB, False)]),
    # Too short a zero run stays in the data around it.
    (4 * MiB, (0, 512 * K), MiB,
     [(0, 576 * K, False), (576 * K, 4 * MiB, True)]),
    # A tail shorter than a block.
    (64 * K + 10, (64 * K + 9,), 64 * K,
     [(0, 64 * K, True), (64 * K, 64 * K + 10, False)]),
])
def test_zero_runs(length, data_at, min_run, expected):
    buf = _buffer(length + 4096, data_at)
    buf[length] = 1  # past the length: never looked at
    assert extents.zero_runs(buf, length, 64 * K, min_run) == expected
