"""Parsing NBD addresses: ovirt-imageio's ``nbd:`` forms and the standard URI.

Accepted (export name rules of NetworkBlockDevice/nbd doc/uri.md):

- ``nbd:unix:/path/sock[:exportname=NAME]``
- ``nbd:HOST:PORT[:exportname=NAME]``
- ``nbd://host[:port][/export]`` (port defaults to 10809)
- ``nbd+unix:///export?socket=/path/sock`` (a socket starting with NUL,
  ``%00``, is an abstract socket)

The export name of a URI is its percent-decoded path without the leading
``/``: ``nbd://h//disk`` names ``/disk``. TLS schemes (``nbds``,
``nbds+unix``) and TLS parameters are refused: this client has no TLS, and
silently dropping encryption that a URI demands is a downgrade.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

DEFAULT_PORT = 10809

Address = str | tuple[str, int]


@dataclass(frozen=True)
class NbdURL:
    """Where an export is: a UNIX socket path or (host, port), and its name."""

    address: Address
    export_name: str = ""


def parse_url(url: str) -> NbdURL:
    """Parse any accepted form; raise ValueError with the reason otherwise."""
    if url.startswith(("nbd://", "nbd+unix://")):
        return _parse_uri(url)
    if url.startswith(("nbds:", "nbds+unix:")):
        raise ValueError(f"TLS NBD URIs are not supported: {url!r}")
    if url.startswith("nbd:"):
        return _parse_legacy(url)
    raise ValueError(f"not an NBD URL: {url!r}")


def _parse_legacy(url: str) -> NbdURL:
    rest = url[len("nbd:") :]
    export = ""
    marker = ":exportname="
    if marker in rest:
        rest, export = rest.split(marker, 1)
    if rest.startswith("unix:"):
        path = rest[len("unix:") :]
        if not path:
            raise ValueError(f"missing socket path in {url!r}")
        return NbdURL(path, export)
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected nbd:HOST:PORT in {url!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return NbdURL((host, _port(port, url)), export)


def _port(text: str, url: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"invalid port {text!r} in {url!r}")
    return int(text)


def _parse_uri(url: str) -> NbdURL:
    parts = urlsplit(url)
    if parts.fragment:
        raise ValueError(f"fragment not allowed in {url!r}")
    query = _query(parts.query, url)
    export = unquote(
        parts.path[1:] if parts.path.startswith("/") else parts.path, errors="strict"
    )
    if "\0" in export:
        raise ValueError(f"export name contains NUL in {url!r}")
    known = {"socket"} if parts.scheme == "nbd+unix" else set()
    for key in query:
        if key.startswith("tls-"):
            raise ValueError(f"TLS parameter {key!r} is not supported")
        if key not in known and not key.startswith("x-"):
            raise ValueError(f"unknown parameter {key!r} in {url!r}")
    if parts.scheme == "nbd+unix":
        if parts.netloc:
            raise ValueError(f"nbd+unix URI must have no authority: {url!r}")
        if not query.get("socket"):
            raise ValueError(f"nbd+unix URI needs ?socket=PATH: {url!r}")
        return NbdURL(query["socket"], export)
    host = parts.hostname
    if not host:
        raise ValueError(f"missing host in {url!r}")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"invalid port in {url!r}") from e
    return NbdURL((host, port or DEFAULT_PORT), export)


def _query(text: str, url: str) -> dict[str, str]:
    """Query parameters, percent-decoded; "+" stays "+" (RFC 3986, not
    HTML forms), so a socket path keeps its characters."""
    params: dict[str, str] = {}
    for item in text.split("&") if text else ():
        key, _, value = item.partition("=")
        key = unquote(key, errors="strict")
        if key in params:
            raise ValueError(f"parameter {key!r} repeated in {url!r}")
        params[key] = unquote(value, errors="strict")
    return params
