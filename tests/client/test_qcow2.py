"""The client's own qcow2 writer, checked by qemu: ``qemu-img check``
finds nothing wrong, ``qemu-img compare`` finds the guest disk written,
and qemu can go on writing the image."""

import contextlib
import os
import random
import subprocess

import pytest

from diskferry.client import qcow2
from diskferry.client.piece import DATA, Cursor, Piece, Progress
from nbd_servers import qemu_img, qemu_io

K = 1024
MiB = K * K
CLUSTER = qcow2.CLUSTER_SIZE


def test_layout_places_shared_clusters_once_and_in_guest_order():
    layout = qcow2.Layout(10 * MiB, [(100, 200), (CLUSTER - 10, CLUSTER + 5),
                                     (3 * CLUSTER, 5 * CLUSTER)])
    # Clusters 0 and 1 (shared by the first two ranges), then 3 and 4.
    assert layout.clusters == 4
    assert [layout.rank(c) for c in (0, 1, 3, 4)] == [0, 1, 2, 3]
    assert layout.host_offset(150) == CLUSTER + 150
    assert layout.host_offset(3 * CLUSTER + 7) == 3 * CLUSTER + 7
    with pytest.raises(ValueError, match="cluster 2"):
        layout.rank(2)


def write(path, size, extents, guest, detect_zeros=True):
    """Write ``guest`` (the whole disk) as a download would: what
    ``extents`` name, in pieces that do not fall on clusters."""
    dst = qcow2.Destination(str(path), size, extents,
                            detect_zeros=detect_zeros)

    class Con:
        """Hands a body out 100 KiB at a time: clusters straddle chunks."""

        @contextlib.contextmanager
        def get(self, offset, length):
            yield ((memoryview(bytearray(guest[pos:pos + n])), pos)
                   for pos in range(offset, offset + length, 100 * K)
                   for n in [min(100 * K, offset + length - pos)])

    with dst:
        for start, end in extents:
            for offset in range(start, end, 300 * K):
                length = min(end, offset + 300 * K) - offset
                dst.receive(Con(), Cursor(Piece(DATA, offset, length),
                                          Progress(None)))
        dst.commit()


def check(path):
    proc = subprocess.run(["qemu-img", "check", path], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No errors were found" in proc.stdout


class SparseDisk:
    """A guest disk of zeros but for ``chunks`` (start -> bytes, later
    ones over earlier ones), read by slices."""

    def __init__(self, chunks):
        self.chunks = chunks

    def __getitem__(self, key):
        out = bytearray(key.stop - key.start)
        for start, chunk in self.chunks.items():
            lo, hi = max(start, key.start), min(start + len(chunk), key.stop)
            if lo < hi:
                out[lo - key.start:hi - key.start] = chunk[lo - start:
                                                           hi - start]
        return out

    def write_raw(self, path, size):
        with open(path, "wb") as f:
            f.truncate(size)
            for start, chunk in self.chunks.items():
                f.seek(start)
                f.write(chunk)


@pytest.mark.parametrize("size", [20 * MiB, 20 * MiB + 1000, 8 * K**4],
                         ids=["aligned", "unaligned", "8TiB"])
def test_written_image_is_the_guest_disk(tmp_path, size):
    rng = random.Random(size)
    # Ranges that share clusters, start and end off them, and one at
    # the very end of the disk.
    extents = [(0, 100 * K), (100 * K + 4096, 3 * MiB), (5 * MiB + 7, 6 * MiB),
               (6 * MiB, 6 * MiB + 64 * K), (19 * MiB, 20 * MiB),
               (size - 4096, size)]
    chunks = {start: rng.randbytes(end - start) for start, end in extents}
    chunks[2 * MiB] = bytes(128 * K)  # zeros inside data
    disk = SparseDisk(chunks)
    out = tmp_path / "disk.qcow2"
    write(out, size, extents, disk)
    check(out)
    # A size off 512-byte sectors is rounded up, as qemu-img create does.
    virtual_size = -(-size // 512) * 512
    assert f'"virtual-size": {virtual_size}' in qemu_img("info",
                                                         "--output=json", out)
    expected = tmp_path / "expected.raw"
    disk.write_raw(expected, size)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                    expected, out], check=True, capture_output=True)
    # Zero detection: the zero run was left unallocated.
    mapping = qemu_img("map", "--output=json", out)
    assert f'"start": {2 * MiB}, "length": {128 * K}, "depth": 0, ' \
        f'"present": false' in mapping


def test_qemu_goes_on_writing_the_image(tmp_path):
    size = 8 * MiB
    guest = os.urandom(size)
    extents = [(0, MiB), (3 * MiB, 4 * MiB)]
    out = tmp_path / "disk.qcow2"
    write(out, size, extents, guest)
    qemu_io(out, "qcow2", "write -P 0x55 512k 1M", "write -P 0x66 6M 1M",
            "discard 3M 64k")
    check(out)
    expected = bytearray(size)
    for start, end in extents:
        expected[start:end] = guest[start:end]
    expected[512 * K:512 * K + MiB] = b"\x55" * MiB
    expected[6 * MiB:7 * MiB] = b"\x66" * MiB
    expected[3 * MiB:3 * MiB + 64 * K] = bytes(64 * K)
    raw = tmp_path / "expected.raw"
    raw.write_bytes(expected)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw,
                    out], check=True, capture_output=True)


def test_refcounts_span_several_blocks(tmp_path):
    """More clusters than one refcount block counts (32768, 2 GiB): only
    the tables are written, the data clusters stay holes (zeros)."""
    size = 3 * 1024**3
    layout = qcow2.Layout(size, [(0, size)])
    written = bytearray(b"\x01" * layout.clusters)
    path = tmp_path / "big.qcow2"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        qcow2.write_tables(fd, layout, written)
    finally:
        os.close(fd)
    check(path)
    assert os.stat(path).st_blocks * 512 < 16 * MiB  # holes


def test_interrupted_image_is_removed(tmp_path):
    out = tmp_path / "disk.qcow2"
    with pytest.raises(RuntimeError):
        with qcow2.Destination(str(out), MiB, [(0, MiB)], detect_zeros=True):
            assert (tmp_path / "disk.qcow2.part").exists()
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
