"""The two spellings of abstract UNIX socket addresses."""

import socket

import pytest

from diskferry.sockaddr import display_address, is_abstract, kernel_address


@pytest.mark.parametrize("address, abstract", [
    ("\0name", True),
    ("@name", True),
    ("\0/org/ovirt/imageio", True),
    ("@/org/ovirt/imageio", True),
    ("/run/x.sock", False),
    ("relative.sock", False),
    ("name@host", False),
    ("", False),
])
def test_is_abstract(address, abstract):
    assert is_abstract(address) is abstract


@pytest.mark.parametrize("address, expected", [
    ("@name", "\0name"),
    ("\0name", "\0name"),
    (b"\0name", "\0name"),
    (b"@name", "\0name"),
    ("@", "\0"),
    ("/run/x.sock", "/run/x.sock"),
    (b"/run/x.sock", "/run/x.sock"),
    ("name@host", "name@host"),
    ("", ""),
])
def test_kernel_address(address, expected):
    assert kernel_address(address) == expected


def test_kernel_address_refuses_bytes_that_are_not_utf8():
    with pytest.raises(UnicodeDecodeError):
        kernel_address(b"\0\xff")


@pytest.mark.parametrize("address, expected", [
    ("\0name", "@name"),
    ("@name", "@name"),
    (b"\0name", "@name"),
    (b"\0\xff", "@\ufffd"),
    ("\0", "@"),
    ("/run/x.sock", "/run/x.sock"),
    (b"/run/x.sock", "/run/x.sock"),
    ("", ""),
])
def test_display_address(address, expected):
    assert display_address(address) == expected


@pytest.mark.parametrize("address", ["@name", "\0name", "/run/x.sock"])
def test_spellings_round_trip(address):
    kernel = kernel_address(address)
    assert kernel_address(display_address(kernel)) == kernel


def test_kernel_address_binds_and_displays_from_getsockname():
    name = f"@diskferry-test-sockaddr-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(kernel_address(name))
        assert display_address(sock.getsockname()) == name
