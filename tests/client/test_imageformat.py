"""Probing a local image's format: the magic-byte table, and probes of
real images made by qemu-img, with and without qemu-img on PATH."""

import os

import pytest

from diskferry.client import imageformat
from diskferry.client.imageformat import TAIL_SIZE, detect_magic

from .helpers import MiB, format_image, make_image


def at(offset, magic, size=4096):
    head = bytearray(size)
    head[offset:offset + len(magic)] = magic
    return bytes(head)


@pytest.mark.parametrize("head, tail, expected", [
    (at(0, b"QFI\xfb\x00\x00\x00\x03"), b"", "qcow2"),
    (at(0, b"QFI\xfb\x00\x00\x00\x02"), b"", "qcow2"),
    (at(0, b"QFI\xfb\x00\x00\x00\x01"), b"", "qcow"),
    (at(0, b"KDMV\x01\x00\x00\x00"), b"", "vmdk"),
    (at(0, b"COWD"), b"", "vmdk"),
    (b"# Disk DescriptorFile\nversion=1\n", b"", "vmdk"),
    (at(0, b"<<< Oracle VM VirtualBox Disk Image >>>\n")[:64]
     + b"\x7f\x10\xda\xbe" + bytes(64), b"", "vdi"),
    (at(0, b"vhdxfile"), b"", "vhdx"),
    (at(0, b"QED\x00"), b"", "qed"),
    (at(0, b"conectix"), b"", "vpc"),
    (bytes(4096), at(0, b"conectix", TAIL_SIZE), "vpc"),  # fixed VHD footer
    (at(0, b"LUKS\xba\xbe\x00\x01"), b"", "luks"),
    (at(257, b"ustar\x0000"), b"", "tar"),                  # POSIX tar
    (at(257, b"ustar  \x00"), b"", "tar"),                  # GNU tar
    (at(0, b"WithoutFreeSpace"), b"", "parallels"),
    (at(0, b"Bochs Virtual HD Image"), b"", "bochs"),
    (bytes(4096), at(0, b"koly", TAIL_SIZE), "dmg"),
    (at(0, b"\xfd7zXZ\x00"), b"", "xz"),
    (at(0, b"\x28\xb5\x2f\xfd"), b"", "zstd"),
    (at(0, b"\x1f\x8b\x08\x00"), b"", "gzip"),
    # Raw: zeros, a boot sector, magics out of place, buffers too short.
    (bytes(4096), bytes(TAIL_SIZE), None),
    (at(510, b"\x55\xaa"), b"", None),
    (b"", b"", None),
    (b"QFI", b"", None),
    (at(256, b"ustar"), b"", None),
    (at(1, b"QFI\xfb"), b"", None),
    (at(64, b"\x7f\x10\xda"), b"", None),
    (bytes(4096), at(1, b"conectix", TAIL_SIZE), None),
    (bytes(4096), b"conectix", None),  # a file shorter than a footer
])
def test_detect_magic(head, tail, expected):
    assert detect_magic(head, tail) == expected


def probe(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return imageformat.probe(str(path), fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


FORMATS = [("qcow2", "qcow2"), ("vmdk", "vmdk"), ("vdi", "vdi"),
           ("vhdx", "vhdx"), ("qed", "qed"), ("vpc", "vpc"),
           ("luks", "luks"), ("vpc-fixed", "vpc"), ("ova", "tar"),
           ("qcow2-over-backing", "qcow2")]


@pytest.mark.parametrize("kind, expected", FORMATS)
def test_probe_with_qemu_img(tmp_path, kind, expected):
    found = probe(format_image(tmp_path, kind))
    assert found.format == expected
    assert not found.raw
    if kind in ("vpc-fixed", "ova"):  # qemu-img calls them raw
        assert found.by == "magic"
    else:
        assert found.by == "qemu-img"
    if kind == "qcow2-over-backing":
        assert found.detail == "over backing file disk.qcow2"
    if kind == "luks":
        assert found.detail == "encrypted"


@pytest.mark.parametrize("kind, expected", FORMATS)
def test_probe_without_qemu_img(tmp_path, monkeypatch, kind, expected):
    image = format_image(tmp_path, kind)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    found = probe(image)
    assert (found.format, found.by) == (expected, "magic")


@pytest.mark.parametrize("qemu", [True, False], ids=["qemu-img", "magic"])
def test_raw_is_raw(tmp_path, monkeypatch, qemu):
    make_image(tmp_path / "disk.raw", 4 * MiB, "sparse")
    if not qemu:
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    found = probe(tmp_path / "disk.raw")
    assert found.raw
    assert found.by == ("qemu-img" if qemu else "magic")


def test_raw_starting_with_a_magic_is_reported(tmp_path):
    # A raw disk whose first bytes happen to be qcow2's magic: qemu-img
    # cannot open it, and that must not pass for raw.
    path = tmp_path / "odd.raw"
    path.write_bytes(b"QFI\xfb" + os.urandom(MiB - 4))
    found = probe(path)
    assert (found.format, found.by) == ("qcow2", "magic")
    assert found.detail.startswith("qemu-img cannot open it: ")
    assert "\n" not in found.detail


def test_qemu_img_gets_an_absolute_path_never_a_protocol(tmp_path,
                                                         monkeypatch):
    # "nbd:..." or "json:{...}" relative names would be protocols to qemu.
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "nbd:localhost:1", MiB, "full")
    found = probe("nbd:localhost:1")
    assert (found.format, found.by) == ("raw", "qemu-img")


def test_empty_file_is_raw(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    assert probe(tmp_path / "empty").raw


def _source_format(path, fmt=None, member=None):
    fd = os.open(path, os.O_RDONLY)
    try:
        return imageformat.source_format(str(path), fd, os.fstat(fd).st_size,
                                         fmt, member=member)
    finally:
        os.close(fd)


def test_source_format(tmp_path):
    image = format_image(tmp_path, "qcow2")
    assert _source_format(image, "raw") == "raw"
    assert _source_format(image) == "qcow2"
    assert _source_format(image, "qcow2") == "qcow2"
    with pytest.raises(imageformat.UnsupportedFormat,
                       match="'nonsense' is not one diskferry reads"):
        _source_format(image, "nonsense")


def test_source_format_refuses_what_qemu_nbd_cannot_serve(tmp_path):
    with pytest.raises(imageformat.UnsupportedFormat) as e:
        _source_format(format_image(tmp_path, "luks"))
    assert e.value.format == "luks"
    assert "with its key" in str(e.value)
    assert 'format="raw"' in str(e.value)


def test_archive_needs_a_member(tmp_path):
    ova = format_image(tmp_path, "ova")
    with pytest.raises(imageformat.UnsupportedFormat) as e:
        _source_format(ova)
    assert e.value.format == "tar"
    assert "--member NAME" in str(e.value)
    assert "vm.ovf, disk1.vmdk" in str(e.value)
    assert _source_format(ova, member="disk1.vmdk") == "vmdk"
    # The descriptor is no disk, but it is the user's word: raw.
    assert _source_format(ova, member="vm.ovf") == "raw"
    with pytest.raises(imageformat.UnsupportedFormat,
                       match="no file member 'nosuch'.*disk1.vmdk"):
        _source_format(ova, member="nosuch")


def test_refusal_is_one_line_whatever_the_path(tmp_path):
    found = imageformat.Probe("qcow2", "qemu-img", "over backing file a\nb")
    text = imageformat.refusal("x\ny.qcow2", found, "--format raw")
    assert "\n" not in text
    assert "x\\x0ay.qcow2 is a qcow2 image" in text
