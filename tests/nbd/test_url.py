"""NBD URL forms, as a table."""

from __future__ import annotations

import pytest

from diskferry.nbd import NbdURL, parse_url

GOOD = [
    ("nbd:unix:/run/sock", NbdURL("/run/sock", "")),
    ("nbd:unix:/run/sock:exportname=sda", NbdURL("/run/sock", "sda")),
    ("nbd:unix:/run/sock:exportname=", NbdURL("/run/sock", "")),
    ("nbd:localhost:10809", NbdURL(("localhost", 10809), "")),
    ("nbd:10.0.0.1:1234:exportname=a b", NbdURL(("10.0.0.1", 1234), "a b")),
    ("nbd:[::1]:1234:exportname=x", NbdURL(("::1", 1234), "x")),
    ("nbd://example.com/disk", NbdURL(("example.com", 10809), "disk")),
    ("nbd://example.com/", NbdURL(("example.com", 10809), "")),
    ("nbd://example.com", NbdURL(("example.com", 10809), "")),
    ("nbd://example.com//disk", NbdURL(("example.com", 10809), "/disk")),
    ("nbd://example.com/hello%20world", NbdURL(("example.com", 10809), "hello world")),
    ("nbd://example.com:2000/a+b", NbdURL(("example.com", 2000), "a+b")),
    ("nbd://[::1]:2000/x", NbdURL(("::1", 2000), "x")),
    ("nbd+unix:///disk?socket=nbd.sock", NbdURL("nbd.sock", "disk")),
    ("nbd+unix:///?socket=/tmp/a+b.sock", NbdURL("/tmp/a+b.sock", "")),
    ("nbd+unix:///?socket=%00/abstract", NbdURL("\0/abstract", "")),
    ("nbd+unix:///%C3%A9?socket=/s&x-extra=1", NbdURL("/s", "\u00e9")),
]

BAD = [
    "http://example.com/",
    "nbds://example.com/",
    "nbds+unix:///?socket=/s",
    "nbd+unix:///disk",
    "nbd+unix:///disk?socket=",
    "nbd+unix://host/disk?socket=/s",
    "nbd+unix:///?socket=/s&socket=/t",
    "nbd+unix:///?socket=/s&tls-type=x509",
    "nbd://example.com/?socket=/s",
    "nbd://example.com/?bogus=1",
    "nbd://example.com:99999/",
    "nbd://example.com/a%00b",
    "nbd://:10809/",
    "nbd:unix:",
    "nbd:localhost",
    "nbd:localhost:port",
    "nbd:localhost:0",
]


@pytest.mark.parametrize(("url", "expected"), GOOD)
def test_parse(url: str, expected: NbdURL) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize("url", BAD)
def test_reject(url: str) -> None:
    with pytest.raises(ValueError):
        parse_url(url)
