"""UnixHTTPConnection against real servers and a silent socket."""

import os
import socket
import time

import pytest

from diskferry.client import TunnelNotSupported, UnixHTTPConnection
from diskferry.sockaddr import display_address

from .helpers import KINDS


@pytest.mark.parametrize("local", ["abstract", "path"])
@pytest.mark.parametrize("kind", KINDS)
def test_request_over_socket(daemons, kind, local):
    srv = daemons.get(kind, local_socket=local)
    addresses = [srv.local_socket]
    if local == "abstract":
        assert srv.local_socket.startswith("\0")
        addresses.append(display_address(srv.local_socket))  # "@name"
    for address in addresses:
        con = UnixHTTPConnection(address, timeout=10)
        try:
            for _ in range(2):  # keep-alive
                con.request("OPTIONS", "/images/*")
                res = con.getresponse()
                assert res.status == 200
                assert "features" in res.read().decode()
        finally:
            con.close()


def test_set_tunnel_is_refused():
    con = UnixHTTPConnection("/nonexistent")
    with pytest.raises(TunnelNotSupported, match="proxy"):
        con.set_tunnel("example.com", 443)
    with pytest.raises(NotImplementedError):
        con.set_tunnel("example.com", 443)


def test_timeout_is_honoured(tmp_path):
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        con = UnixHTTPConnection(path, timeout=0.3)
        start = time.monotonic()
        con.request("GET", "/")
        with pytest.raises(TimeoutError):
            con.getresponse()
        assert time.monotonic() - start < 5
        con.close()


def test_missing_socket_fails_to_connect(tmp_path):
    con = UnixHTTPConnection(str(tmp_path / "missing.sock"))
    with pytest.raises(FileNotFoundError):
        con.connect()


def _connected_timeout(tmp_path, **kwargs):
    path = str(tmp_path / "t.sock")
    if os.path.exists(path):
        os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        con = UnixHTTPConnection(path, **kwargs)
        try:
            con.connect()
            return con.sock.gettimeout()
        finally:
            con.close()


def test_timeout_left_out_keeps_the_socket_default(tmp_path):
    """As http.client does: no timeout given, the socket module's default
    applies; a timeout given (None included) is set on the socket."""
    assert _connected_timeout(tmp_path) is None
    saved = socket.getdefaulttimeout()
    socket.setdefaulttimeout(7.5)
    try:
        assert _connected_timeout(tmp_path) == 7.5
        assert _connected_timeout(tmp_path, timeout=None) is None
        assert _connected_timeout(tmp_path, timeout=2.0) == 2.0
    finally:
        socket.setdefaulttimeout(saved)
