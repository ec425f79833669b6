"""Hints for failures whose message does not say what went wrong.

A certificate that cannot be verified says nothing of ``--cafile``: the
hint names it. An ``http://`` URL sent to a TLS port gets a reset
connection (or a TLS alert read as garbage), which says nothing about
the scheme. When a
request on an ``http://`` URL fails, the port is asked for a TLS
handshake: if it answers one, the hint says to use ``https://``. The
converse, ``https://`` to a plain HTTP port, shows as an SSL "wrong
version number" error and is recognised from it.
"""

import socket
import ssl
import urllib.parse

#: Seconds the TLS probe may take: it runs only after a failure.
PROBE_TIMEOUT = 5.0


def for_error(url: str, error: BaseException) -> str | None:
    """A hint for ``error`` met on ``url``, or None."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "http" and parts.hostname and \
            speaks_tls(parts.hostname, parts.port or 80):
        return (f"{parts.hostname}:{parts.port or 80} speaks TLS: use "
                f"https://{parts.netloc}{parts.path}")
    if parts.scheme == "https" and "WRONG_VERSION_NUMBER" in _chain(error):
        return (f"{parts.netloc} does not speak TLS: is it a plain HTTP "
                f"port (http://{parts.netloc}{parts.path})?")
    if parts.scheme == "https" and certificate_unverified(error):
        return ("give --cafile with the CA that signed the server's "
                "certificate (a daemon's own: pki/ca.pem in its state folder)")
    return None


def certificate_unverified(error: BaseException) -> bool:
    """Whether ``error`` comes from a server certificate that could not
    be verified (a CA file would fix it)."""
    return "CERTIFICATE_VERIFY_FAILED" in _chain(error)


def speaks_tls(host: str, port: int) -> bool:
    """Whether ``host:port`` completes a TLS handshake (not verified:
    this only tells the protocol)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), PROBE_TIMEOUT) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return True
    except (OSError, ValueError):
        return False


def _chain(error: BaseException | None) -> str:
    """The messages of ``error`` and its causes, joined."""
    text: list[str] = []
    while error is not None and len(text) < 10:
        text.append(str(error))
        error = error.__cause__ or error.__context__
    return " ".join(text)
