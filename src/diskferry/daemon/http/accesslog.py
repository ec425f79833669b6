"""The access log: one line per request, secrets (ticket ids) shortened.

    [remote/3] 127.0.0.1:40112 GET /a/6f1c... 206 bytes=1048576 0.004s 250.0MiB/s
    [local/7] local OPTIONS /a/d... 403 0.000s: No such ticket 'd...'

A line says what was asked (method, path), what was answered (status,
``-`` when the client left before any answer), how much image data the
request moved (``bytes``, as the handler counted it), how long it took
and at what rate. A refused or failed request has its cause instead of
the bytes and the rate (for a transfer cut short, ``size``: what was
asked): the error is logged there, once, rather than on a line of its
own.

A ticket id is a bearer secret: whoever reads it in a log may use the
image. The application says which of its paths name one
(``SecretPaths``, declared with its routes), and error messages repeat
it, so every occurrence on a line is shortened to a prefix too short to
guess from (``secret_prefix``). The server core itself names no route.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from diskferry.daemon.http.request import AccessRecord

#: Characters of a secret a log may show, at most.
PREFIX = 4

#: Shortest secret replaced also where it is not quoted: a shorter one
#: ("a", "demo") may be part of any word of a message.
_BARE_MIN = 8

#: Path segments that name no secret: ``OPTIONS /a/*``, ``GET /a/``.
_NOT_SECRETS = ("", "*")


def secret_prefix(secret: str) -> str:
    """``secret`` shortened to at most a quarter of it, 4 characters at
    most, and "...": never enough to use it."""
    return secret[:min(PREFIX, len(secret) // 4)] + "..."


@dataclass(frozen=True)
class SecretPaths:
    """Where an application's paths carry a bearer secret, and what else
    its messages call one, so that a log line shows neither whole.

    ``prefixes``: the path segment right after each is a secret.
    ``alias``: another name a message may give a secret, made from it
    (a transfer named after its ticket); the log shows it made from the
    shortened secret instead. The default names no secret at all.
    """

    prefixes: tuple[str, ...] = ()
    alias: Callable[[str], str] | None = None
    _in_text: re.Pattern[str] | None = field(init=False, repr=False,
                                              compare=False)

    def __post_init__(self) -> None:
        pattern = None
        if self.prefixes:
            pattern = re.compile(
                "(" + "|".join(map(re.escape, self.prefixes)) + ")"
                r"([^/\s'\"?\\]+)")
        object.__setattr__(self, "_in_text", pattern)

    def secret(self, path: str) -> str | None:
        """The secret a request path names, if any."""
        for prefix in self.prefixes:
            if path.startswith(prefix):
                value = path[len(prefix):].split("/", 1)[0]
                return None if value in _NOT_SECRETS else value
        return None

    def redact_path(self, path: str) -> str:
        """``path`` with the secret it names shortened."""
        for prefix in self.prefixes:
            if path.startswith(prefix):
                secret, slash, rest = path[len(prefix):].partition("/")
                if secret in _NOT_SECRETS:
                    return path
                return prefix + secret_prefix(secret) + slash + rest
        return path

    def redact_paths(self, text: str) -> str:
        """``text`` with the secrets of the paths in it shortened
        (messages that quote a malformed request line or target)."""
        if self._in_text is None:
            return text
        return self._in_text.sub(
            lambda m: m.group(1) + (m.group(2) if m.group(2) in _NOT_SECRETS
                                    else secret_prefix(m.group(2))), text)

    def redact(self, text: str, secret: str | None) -> str:
        """``text`` with ``secret`` shortened where it is quoted (``repr``,
        as error messages name ids), in its alias, and, when it is long
        enough not to be part of other words, wherever it occurs."""
        if not secret:
            return text
        short = secret_prefix(secret)
        text = text.replace(repr(secret), repr(short))
        if self.alias is not None:
            text = text.replace(self.alias(secret), self.alias(short))
        if len(secret) >= _BARE_MIN:
            text = text.replace(secret, short)
        return text


def line(*, conn_id: str, client: str, method: str, path: str,
         status: int | None, record: AccessRecord, elapsed: float,
         cause: str | None = None,
         secrets: SecretPaths = SecretPaths()) -> str:
    """The access line of one request (see the module's docstring)."""
    secret = secrets.secret(path)
    parts = [f"[{conn_id}]", client, method, secrets.redact_path(path),
             str(status) if status is not None else "-"]
    if record.transfer_id is not None:
        parts.append(f"transfer={record.transfer_id}")
    if record.offset is not None:
        parts.append(f"offset={record.offset}")
    parts += _outcome(record.size, elapsed, failed=cause is not None)
    text = secrets.redact(" ".join(parts), secret)
    if cause is not None:
        text += f": {secrets.redact_paths(secrets.redact(cause, secret))}"
    return text


def _outcome(size: int | None, elapsed: float, failed: bool) -> list[str]:
    """Bytes moved, seconds and rate; for a failed request, how much of
    it moved is unknown: what was asked (``size``) and the seconds."""
    if failed:
        return ([f"size={size}"] if size is not None else []) + \
            [f"{elapsed:.3f}s"]
    moved = size or 0
    parts = [f"bytes={moved}", f"{elapsed:.3f}s"]
    if moved and elapsed > 0:
        parts.append(f"{moved / elapsed / 1024**2:.1f}MiB/s")
    return parts
