"""Positional reads and writes that finish the job, on real files."""

import os

from diskferry.fileio import preadv_full, pwrite_all


def test_pwrite_all_writes_everything_at_its_offset(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"." * 10)
    fd = os.open(path, os.O_RDWR)
    try:
        assert pwrite_all(fd, bytearray(b"abc"), 4) == 3
        assert pwrite_all(fd, memoryview(b"xyz0123")[3:], 12) == 4
    finally:
        os.close(fd)
    assert path.read_bytes() == b"....abc...\0\x000123"


def test_preadv_full_stops_at_the_end_of_the_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(8)
        assert preadv_full(fd, buf, 1) == 8
        assert buf == b"12345678"
        assert preadv_full(fd, buf, 6) == 4
        assert buf[:4] == b"6789"
        assert preadv_full(fd, memoryview(buf)[:0], 0) == 0
    finally:
        os.close(fd)
