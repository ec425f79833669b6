"""Reading a qcow2 chain in place: the layout taken from ``qemu-img map``,
and what sends an image back to qemu-nbd."""

import logging

import pytest

from diskferry import client
from diskferry.client import formats, mapped
from diskferry.extent import Extent
from nbd_servers import qemu_img, qemu_io

MiB = 1024**2
FILES = ("/top.qcow2", "/base.qcow2")


def entry(start, length, depth=0, zero=False, data=True, offset=None,
          present=True):
    e = {"start": start, "length": length, "depth": depth,
         "present": present, "zero": zero, "data": data}
    if offset is not None:
        e["offset"] = offset
    return e


def test_layout_merges_extents_and_keeps_each_place():
    layout = mapped._layout(FILES, [
        entry(0, 64, offset=1000),
        entry(64, 64, depth=1, offset=5000),
        entry(128, 64, zero=True, data=False),
        entry(192, 64, zero=True, data=False),
        entry(256, 64, depth=2, zero=True, data=False, present=False),
        entry(320, 64, offset=2000),
    ])
    assert layout.extents == [Extent(0, 128, False, False),
                              Extent(128, 128, True, False),
                              Extent(256, 64, True, True),
                              Extent(320, 64, False, False)]
    # A range across two layers: one part in each, at its own place.
    assert layout.parts(32, 96) == [(0, 1032, 32), (1, 5000, 32)]
    assert layout.parts(320, 384) == [(0, 2000, 64)]
    with pytest.raises(ValueError, match="offset 128"):
        layout.parts(100, 200)


@pytest.mark.parametrize("entries", [
    # Compressed: data with no plain offset.
    [entry(0, 64)],
    # Neither zero nor data: nothing to read it from.
    [entry(0, 64, data=False)],
    # Data in a layer below the chain qemu-img info listed.
    [entry(0, 64, depth=2, offset=0)],
    # Not contiguous.
    [entry(0, 64, offset=0), entry(128, 64, offset=64)],
    # Malformed.
    [{"start": 0}],
], ids=["compressed", "no-data", "unknown-layer", "gap", "malformed"])
def test_layout_refuses_what_has_no_plain_place(entries):
    assert mapped._layout(FILES, entries) is None


def image(tmp_path, *writes, fmt="qcow2"):
    path = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-f", fmt, path, 4 * MiB)
    qemu_io(path, fmt, *writes)
    return str(path)


def layout_of(path, **kw):
    return mapped.plain_layout(path, formats.open_source(path, "qcow2", **kw))


def test_plain_qcow2_maps_into_its_file(tmp_path):
    path = image(tmp_path, "write -P 0x41 1M 64k")
    layout = layout_of(path)
    assert layout.files == (path,)
    assert [e for e in layout.extents if not e.zero] == [
        Extent(MiB, 64 * 1024, False, False)]
    [(layer, offset, n)] = layout.parts(MiB, MiB + 64 * 1024)
    with open(path, "rb") as f:
        f.seek(offset)
        assert f.read(n) == b"\x41" * n


def test_compressed_qcow2_has_no_plain_layout(tmp_path):
    path = image(tmp_path, "write -c -P 0x41 1M 64k")
    assert layout_of(path) is None


def test_external_data_file_has_no_plain_layout(tmp_path):
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", "-o",
             f"data_file={tmp_path / 'data.raw'}", path, 4 * MiB)
    qemu_io(path, "qcow2", "write -P 0x41 0 64k")
    assert layout_of(str(path)) is None


def test_too_large_a_map_is_read_through_qemu_nbd(daemons, make_ticket,
                                                   tmp_path, monkeypatch,
                                                   caplog):
    path = image(tmp_path, "write -P 0x41 0 64k", "write -P 0x42 1M 64k")
    monkeypatch.setattr(mapped, "MAX_MAP_BYTES", 100)
    srv = daemons.get("diskferry")
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xee" * 4 * MiB)
    t = make_ticket(srv, target, 4 * MiB)
    with caplog.at_level(logging.DEBUG, logger="diskferry.client"):
        client.upload(path, srv.image_url(t["uuid"]), cafile=srv.ca_file)
    assert "through qemu-nbd" in caplog.text
    expected = bytearray(4 * MiB)
    expected[:64 * 1024] = b"\x41" * 64 * 1024
    expected[MiB:MiB + 64 * 1024] = b"\x42" * 64 * 1024
    assert target.read_bytes() == expected
