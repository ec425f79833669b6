"""The block-based image checksum, and its agreement with ovirt-imageio."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from diskferry import checksum
from diskferry.daemon.backends.base import Extent
from diskferry.daemon.backends.memory import MemoryBackend
from diskferry.errors import BackendError, BadRequest

MiB = 1024 * 1024
BS = checksum.MIN_BLOCK_SIZE  # Small blocks keep the images small.


def reference(content, algorithm="blake2b", block_size=BS):
    """The scheme written as plainly as possible: hash of block hashes."""
    def h(data=b""):
        if algorithm.startswith("blake2"):
            return hashlib.new(algorithm, data, digest_size=32)
        return hashlib.new(algorithm, data)

    outer = h()
    for offset in range(0, len(content), block_size):
        outer.update(h(content[offset:offset + block_size]).digest())
    return outer.hexdigest()


def image(*parts):
    """Concatenate parts: bytes as is, an int as that many zero bytes."""
    return b"".join(bytes(p) if isinstance(p, int) else p for p in parts)


# --- The scheme -------------------------------------------------------------

SCHEME_CASES = {
    "empty": image(),
    "one byte": image(b"x"),
    "one partial block": image(b"x" * (BS // 3)),
    "exact block": image(b"d" * BS),
    "exact multiple": image(b"a" * BS, b"b" * BS, b"c" * BS),
    "zero image": image(3 * BS),
    "zero partial image": image(BS + 17),
    "zero then data": image(2 * BS, b"d" * BS),
    "data then zero tail": image(b"d" * 10, 2 * BS + 5),
    "data in last byte": image(3 * BS - 1, b"z"),
    "data across boundary": image(BS - 2, b"abcd", BS),
    "partial zero last block": image(b"d" * BS, BS // 2),
}


@pytest.mark.parametrize("content", SCHEME_CASES.values(), ids=SCHEME_CASES)
@pytest.mark.parametrize("block_size", [BS, BS + 4096, 2 * BS])
def test_scheme(content, block_size):
    result = checksum.compute(MemoryBackend(content), block_size=block_size)
    assert result == {
        "algorithm": "blake2b",
        "block_size": block_size,
        "checksum": reference(content, block_size=block_size),
    }


@pytest.mark.parametrize("algorithm", checksum.ALGORITHMS)
def test_every_algorithm(algorithm):
    content = image(b"x" * 100, 2 * BS, b"y")
    result = checksum.compute(MemoryBackend(content), algorithm, BS)
    assert result["algorithm"] == algorithm
    assert result["checksum"] == reference(content, algorithm)


def test_digest_sizes():
    content = image(b"x")
    blake2b = checksum.compute(MemoryBackend(content), "blake2b", BS)["checksum"]
    blake2s = checksum.compute(MemoryBackend(content), "blake2s", BS)["checksum"]
    sha512 = checksum.compute(MemoryBackend(content), "sha512", BS)["checksum"]
    assert len(blake2b) == len(blake2s) == 64
    assert len(sha512) == 128


def test_known_digests():
    # Values computed by ovirt-imageio 2.5.1 (blkhash, default parameters).
    assert checksum.compute(MemoryBackend(0))["checksum"] == (
        "0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8")
    ten_mib = MemoryBackend(10 * MiB)
    ten_mib.write(memoryview(b"x"), 5000000)
    assert checksum.compute(ten_mib)["checksum"] == (
        "b1085c2deabd98dd7d5c4c8888c38ea0c78d5da3828ca49f42bc3ca708f8a0c7")


def test_block_size_changes_digest():
    backend = MemoryBackend(image(b"x", 3 * BS))
    small = checksum.compute(backend, block_size=BS)["checksum"]
    large = checksum.compute(backend, block_size=2 * BS)["checksum"]
    assert small != large


def test_defaults():
    assert checksum.DEFAULT_ALGORITHM == "blake2b"
    assert checksum.DEFAULT_BLOCK_SIZE == 4 * MiB
    result = checksum.compute(MemoryBackend(b"x"))
    assert result["algorithm"] == "blake2b"
    assert result["block_size"] == 4 * MiB


def test_huge_zero_image_is_not_read():
    blocks = 3 * checksum.ZERO_DIGESTS_PER_UPDATE + 7
    backend = ExtentsBackend(b"", size=blocks * BS)
    digest = hashlib.blake2b(bytes(BS), digest_size=32).digest()
    expected = hashlib.blake2b(digest * blocks, digest_size=32).hexdigest()
    assert checksum.compute(backend, block_size=BS)["checksum"] == expected
    assert backend.reads == []


# --- Extents decide what is read, never the digest --------------------------

class ExtentsBackend(MemoryBackend):
    """A memory image that reports the given extents and records its reads.

    ``size`` larger than the content makes a sparse image that reports
    one zero extent past the content (reading there fails the test).
    """

    def __init__(self, content, extents=None, size=None):
        super().__init__(content)
        self._size = len(content) if size is None else size
        self._extents = extents
        self.reads = []
        self.buffers = set()

    def size(self):
        return self._size

    def readinto(self, buf, offset):
        self.reads.append((offset, len(buf)))
        self.buffers.add(id(buf.obj))
        assert offset + len(buf) <= len(self.data), "read of a zero extent"
        return super().readinto(buf, offset)

    def extents(self, start, length):
        if self._extents is None:
            if self._size > len(self.data):
                return [Extent(len(self.data), self._size - len(self.data), True)]
            return super().extents(start, length)
        end = start + length
        return [e for e in self._extents if e.end > start and e.start < end]


LAYOUT_CONTENT = image(b"a" * 100, BS, b"b", 2 * BS + 10, b"c" * 7, BS // 2)


def extents_of(*runs):
    """Extents from (length, zero) runs laid end to end."""
    result, start = [], 0
    for length, zero in runs:
        result.append(Extent(start, length, zero, hole=zero))
        start += length
    return result


LAYOUTS = {
    "all data": extents_of((len(LAYOUT_CONTENT), False)),
    "exact": extents_of((100, False), (BS, True), (1, False), (2 * BS + 10, True),
                        (7, False), (BS // 2, True)),
    "tiny extents": extents_of(*[(4096, False)] * (len(LAYOUT_CONTENT) // 4096),
                               (len(LAYOUT_CONTENT) % 4096, False)),
    "split zero extents": extents_of((100, False), (BS // 2, True), (BS // 2, True),
                                     (1, False), (BS, True), (BS + 10, True),
                                     (7, False), (BS // 2, True)),
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS)
def test_extent_layout_does_not_change_digest(layout):
    backend = ExtentsBackend(LAYOUT_CONTENT, layout)
    result = checksum.compute(backend, block_size=BS)
    assert result["checksum"] == reference(LAYOUT_CONTENT)


def test_zero_blocks_are_not_read():
    content = image(b"d" * BS, 3 * BS, b"e" * 10)
    extents = extents_of((BS, False), (3 * BS, True), (10, False))
    backend = ExtentsBackend(content, extents)
    checksum.compute(backend, block_size=BS)
    assert backend.reads == [(0, BS), (4 * BS, 10)]


def test_block_partly_zero_is_read():
    content = image(b"d" * 10, 2 * BS - 10)
    extents = extents_of((10, False), (2 * BS - 10, True))
    backend = ExtentsBackend(content, extents)
    checksum.compute(backend, block_size=BS)
    assert backend.reads == [(0, BS)]


def test_one_buffer_for_all_reads():
    content = bytes(range(256)) * (5 * BS // 256)
    backend = ExtentsBackend(content)
    checksum.compute(backend, block_size=BS)
    assert len(backend.reads) == 5
    assert len(backend.buffers) == 1


def test_extents_asked_by_window(monkeypatch):
    monkeypatch.setattr(checksum, "CHECKSUM_EXTENTS_WINDOW", 2 * BS)
    content = image(b"x", 4 * BS, b"y" * (BS // 3))
    calls = []

    class Recording(MemoryBackend):
        def extents(self, start, length):
            calls.append((start, length))
            return super().extents(start, length)

    result = checksum.compute(Recording(content), block_size=BS)
    assert result["checksum"] == reference(content)
    assert calls == [(0, 2 * BS), (2 * BS, 2 * BS), (4 * BS, 1 + BS // 3)]
    assert len(content) == 4 * BS + 1 + BS // 3


def test_short_image_fails():
    class Truncated(MemoryBackend):
        def size(self):
            return BS

        def extents(self, start, length):
            return [Extent(start, length, zero=False)]

    backend = Truncated(b"x" * 10)
    with pytest.raises(BackendError, match="ended at 10"):
        checksum.compute(backend, block_size=BS)


def test_progress_accounts_every_byte():
    content = image(b"x", 3 * BS, b"y" * 5)
    counts = []
    checksum.compute(MemoryBackend(content), block_size=BS, progress=counts.append)
    assert sum(counts) == len(content)


def test_progress_can_stop_the_computation():
    class Canceled(Exception):
        pass

    def cancel(count):
        raise Canceled

    with pytest.raises(Canceled):
        checksum.compute(MemoryBackend(b"x" * BS), block_size=BS, progress=cancel)


@pytest.mark.parametrize("extents, expected", [
    ([], [(0, 3 * BS, False)]),
    (extents_of((3 * BS, True)), [(0, 3 * BS, True)]),
    (extents_of((1, False), (3 * BS - 1, True)), [(0, BS, False), (BS, 3 * BS, True)]),
    (extents_of((BS + 1, True), (BS - 1, False), (BS, True)),
     [(0, BS, True), (BS, 2 * BS, False), (2 * BS, 3 * BS, True)]),
    # Zero extents smaller than a block make no zero block.
    (extents_of((BS // 2, False), (BS, True), (BS + BS // 2, False)),
     [(0, 3 * BS, False)]),
    # Adjacent zero extents merge across the block boundary.
    (extents_of((BS // 2, True), (BS, True), (BS + BS // 2, False)),
     [(0, BS, True), (BS, 3 * BS, False)]),
])
def test_block_runs(extents, expected):
    assert list(checksum.block_runs(extents, 0, 3 * BS, BS)) == expected


def test_block_runs_partial_last_block():
    extents = extents_of((BS, False), (BS + 10, True))
    assert list(checksum.block_runs(extents, 0, 2 * BS + 10, BS)) == [
        (0, BS, False), (BS, 2 * BS + 10, True)]
    extents = extents_of((BS + 5, False), (5, True))
    assert list(checksum.block_runs(extents, 0, BS + 10, BS)) == [
        (0, BS + 10, False)]


def test_block_runs_of_a_window():
    extents = extents_of((5 * BS, True))
    assert list(checksum.block_runs(extents, 2 * BS, 4 * BS, BS)) == [
        (2 * BS, 4 * BS, True)]


# --- Parameters -------------------------------------------------------------

def test_algorithms_answer():
    answer = checksum.algorithms()
    assert answer == {"algorithms": sorted(answer["algorithms"])}
    assert "blake2b" in answer["algorithms"]
    assert "sha256" in answer["algorithms"]
    # The digest of a shake hash has no fixed length; the scheme needs one.
    assert "shake_128" not in answer["algorithms"]
    assert checksum.ALGORITHMS == sorted(checksum.ALGORITHMS)


@pytest.mark.parametrize("algorithm, block_size, expected", [
    (None, None, ("blake2b", 4 * MiB)),
    ("sha256", None, ("sha256", 4 * MiB)),
    (None, "1048576", ("blake2b", MiB)),
    (None, 16 * MiB, ("blake2b", 16 * MiB)),
    (None, MiB + 4096, ("blake2b", MiB + 4096)),
])
def test_validate_accepts(algorithm, block_size, expected):
    assert checksum.validate(algorithm, block_size) == expected


@pytest.mark.parametrize("algorithm, block_size, match", [
    ("nope", None, "'algorithm' query parameter: 'nope'"),
    ("", None, "'algorithm' query parameter: ''"),
    ("BLAKE2B", None, "'algorithm' query parameter: 'BLAKE2B'"),
    ("shake_128", None, "'algorithm' query parameter: 'shake_128'"),
    (None, "abc", "block_size 'abc'"),
    (None, "", "block_size ''"),
    (None, "1.5", "block_size '1.5'"),
    (None, MiB - 4096, "block_size 1044480: must be between"),
    (None, 16 * MiB + 4096, "block_size 16781312: must be between"),
    (None, 0, "block_size 0"),
    (None, -MiB, "block_size -1048576"),
    (None, MiB + 512, "block_size 1049088: must be a multiple of 4096"),
])
def test_validate_rejects(algorithm, block_size, match):
    with pytest.raises(BadRequest, match=match) as e:
        checksum.validate(algorithm, block_size)
    assert e.value.status == 400


def test_compute_validates():
    with pytest.raises(BadRequest, match="block_size"):
        checksum.compute(MemoryBackend(1), block_size=4096)


# --- Local files ------------------------------------------------------------

def make_file(path, size, writes=()):
    """A sparse file of ``size`` bytes with ``(offset, data)`` written."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes:
            f.seek(offset)
            f.write(data)
    return path


def test_file_holes_and_written_zeros_agree(tmp_path):
    size = 3 * BS + 12345
    writes = [(BS + 7, b"data")]
    sparse = make_file(tmp_path / "sparse", size, writes)
    written = make_file(tmp_path / "written", size, [(0, bytes(size))] + writes)
    if os.stat(sparse).st_blocks * 512 >= size:
        pytest.skip("file system does not keep holes")
    content = sparse.read_bytes()
    for path in (sparse, written):
        result = checksum.compute_file(path, block_size=BS)
        assert result["checksum"] == reference(content)


def test_file_matches_backend(tmp_path):
    content = image(b"x" * 5000, 2 * BS, b"y" * 3, BS // 2)
    path = tmp_path / "image"
    path.write_bytes(content)
    assert (checksum.compute_file(path, "sha256", BS)
            == checksum.compute(MemoryBackend(content), "sha256", BS))


def test_file_empty(tmp_path):
    path = make_file(tmp_path / "empty", 0)
    assert checksum.compute_file(path)["checksum"] == reference(b"")


def test_file_missing(tmp_path):
    with pytest.raises(BackendError, match="missing"):
        checksum.compute_file(tmp_path / "missing")


# --- Compatibility with ovirt-imageio ---------------------------------------

# Runs in the venv's Python, where ovirt-imageio 2.5.1 is installed. Two
# code paths of its own: the client's checksum (qemu-nbd exports the
# file; the daemon's checksum operation walks NBD extents) and blkhash's
# plain read of every block. qemu exposes a raw file rounded up to whole
# 512-byte sectors, so the NBD path hashes the file padded with zeros.
OVIRT_PEER = textwrap.dedent("""
    import json, os, sys
    from ovirt_imageio import client
    from ovirt_imageio._internal import blkhash
    from ovirt_imageio._internal.handlers import checksum

    jobs = json.load(sys.stdin)
    results = []
    for path, algorithm, block_size in jobs:
        digest_size = 32 if algorithm.startswith("blake2") else None
        read = blkhash.checksum(path, block_size=block_size,
                                algorithm=algorithm, digest_size=digest_size)
        if os.path.getsize(path):
            nbd = client.checksum(path, block_size=block_size,
                                  algorithm=algorithm)
        else:
            nbd = read  # its NBD client cannot export an empty image
        results.append({"read": read, "nbd": nbd})
    print(json.dumps({"results": results,
                      "algorithms": sorted(checksum.ALGORITHMS)}))
""")


def ovirt_imageio(jobs):
    pytest.importorskip("ovirt_imageio")
    out = subprocess.run(
        [sys.executable, "-c", OVIRT_PEER], input=json.dumps(jobs),
        capture_output=True, text=True, check=True, timeout=300).stdout
    return json.loads(out)


QEMU_SECTOR_SIZE = 512

COMPAT_IMAGES = {
    "empty": (0, []),
    "one byte": (1, [(0, b"x")]),
    "odd size data": (4 * MiB + 1, [(0, os.urandom(4 * MiB + 1))]),
    "sparse islands": (20 * MiB, [(MiB + 100, b"island"), (8 * MiB - 3, b"across"),
                                  (17 * MiB, os.urandom(MiB))]),
    "sparse odd tail": (10 * MiB + 123, [(0, b"head"), (10 * MiB + 100, b"tail")]),
    "all hole": (9 * MiB + 4096, []),
    "written zeros": (6 * MiB + 7, [(0, bytes(6 * MiB + 7))]),
    "random": (6 * MiB + 4095, [(0, os.urandom(6 * MiB + 4095))]),
}
COMPAT_PARAMS = [
    ("blake2b", 4 * MiB),
    ("blake2b", MiB),
    ("blake2s", 16 * MiB),
    ("sha256", 4 * MiB + 4096),
    ("md5", 2 * MiB),
]


@pytest.fixture(scope="module")
def compat_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("compat")
    return {name: make_file(directory / name.replace(" ", "-"), size, writes)
            for name, (size, writes) in COMPAT_IMAGES.items()}


def test_same_digests_as_ovirt_imageio(compat_files):
    jobs = [(str(path), algorithm, block_size)
            for path in compat_files.values()
            for algorithm, block_size in COMPAT_PARAMS]
    theirs = ovirt_imageio(jobs)["results"]
    for (path, algorithm, block_size), their in zip(jobs, theirs, strict=True):
        content = open(path, "rb").read()
        params = (path, algorithm, block_size)
        ours = checksum.compute_file(path, algorithm, block_size)
        in_memory = checksum.compute(MemoryBackend(content), algorithm, block_size)
        assert their["read"] == ours == in_memory, params
        padded = content + bytes(-len(content) % QEMU_SECTOR_SIZE)
        in_sectors = checksum.compute(MemoryBackend(padded), algorithm, block_size)
        assert their["nbd"] == in_sectors, params


def test_algorithms_compared_with_ovirt_imageio():
    theirs = ovirt_imageio([])["algorithms"]
    assert set(checksum.ALGORITHMS) <= set(theirs)
    # ovirt-imageio lists the shake variants too, and fails computing them.
    assert set(theirs) - set(checksum.ALGORITHMS) <= {"shake_128", "shake_256"}
