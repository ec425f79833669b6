"""Start and stop real image daemons for tests.

Two kinds of daemon speak the same wire protocol:

- ``ovirt-imageio``: the reference implementation (ovirt-imageio 2.5.1 from
  the venv), started as ``ovirt-imageio --conf-dir DIR``.
- ``diskferry``: this project, started as ``python -m diskferry serve
  --config FILE``.

``start_server()`` writes a configuration for the requested kind, starts
the daemon in its own process group with stderr captured in a log file,
and waits until both the control socket answers HTTP and the remote TCP
port accepts connections.  The returned ``Server`` knows how to reach
every service and how to manage tickets over the control socket.

Nothing here uses mocks: every call is a real HTTP request on a real
socket.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from diskferry.client.uhttp import UnixHTTPConnection
from diskferry.daemon.pki import ensure_pki

KINDS = ("ovirt-imageio", "diskferry")

VENV_BIN = Path(sys.executable).parent
OVIRT_IMAGEIO = Path(os.environ.get("OVIRT_IMAGEIO", VENV_BIN / "ovirt-imageio"))

# How long a daemon may take to become ready (ovirt-imageio imports a lot).
START_TIMEOUT = 20.0

# How long stop() waits after SIGTERM before SIGKILL.
STOP_TIMEOUT = 10.0


# --- PKI ---------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    ca_file: str
    cert_file: str
    key_file: str


def make_pki(directory: str | os.PathLike) -> PKI:
    """A CA and a server certificate for localhost, 127.0.0.1 and ::1."""
    files = ensure_pki(directory, hostnames=["localhost"],
                       ips=["127.0.0.1", "::1"])
    return PKI(ca_file=str(files.ca_file), cert_file=str(files.cert_file),
               key_file=str(files.key_file))


# --- HTTP over UNIX sockets --------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TicketError(Exception):
    """The control service answered a ticket request with an error."""

    def __init__(self, method, path, status, body):
        super().__init__(f"{method} {path}: {status} {body!r}")
        self.status = status
        self.body = body


# --- Server ------------------------------------------------------------------


@dataclass
class Server:
    name: str
    url_base: str
    ca_file: str | None
    control_socket: str
    local_socket: str | None
    pid: int
    log_path: str
    workdir: str
    host: str
    port: int
    tls: bool
    proc: subprocess.Popen = field(repr=False)

    # -- control service

    def control(self, method, path, body=None, headers=None, timeout=30.0):
        """Send one request to the control service; return (status, headers,
        body bytes)."""
        con = UnixHTTPConnection(self.control_socket, timeout=timeout)
        try:
            if isinstance(body, dict | list):
                body = json.dumps(body).encode()
            con.request(method, path, body=body, headers=headers or {})
            res = con.getresponse()
            data = res.read()
            return res.status, res.headers, data
        finally:
            con.close()

    def add_ticket(self, ticket: dict) -> None:
        path = f"/tickets/{ticket['uuid']}"
        status, _, data = self.control("PUT", path, ticket)
        if status != 200:
            raise TicketError("PUT", path, status, data)

    def get_ticket(self, ticket_id: str) -> dict:
        path = f"/tickets/{ticket_id}"
        status, _, data = self.control("GET", path)
        if status != 200:
            raise TicketError("GET", path, status, data)
        return json.loads(data)

    def delete_ticket(self, ticket_id: str) -> None:
        path = f"/tickets/{ticket_id}"
        status, _, data = self.control("DELETE", path)
        if status != 204:
            raise TicketError("DELETE", path, status, data)

    def extend_ticket(self, ticket_id: str, timeout: int) -> None:
        path = f"/tickets/{ticket_id}"
        status, _, data = self.control("PATCH", path, {"timeout": timeout})
        if status != 200:
            raise TicketError("PATCH", path, status, data)

    # -- images service

    def image_url(self, ticket_id: str) -> str:
        return f"{self.url_base}/images/{ticket_id}"

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        return ctx

    def remote_connection(self, timeout: float | None = 30.0):
        """A new http.client connection to the remote service."""
        if self.tls:
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout, context=self.ssl_context()
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def local_connection(self, timeout: float | None = 30.0):
        """A new http.client connection to the local (UNIX socket) service."""
        if self.local_socket is None:
            raise RuntimeError(f"{self.name}: local service disabled")
        return UnixHTTPConnection(self.local_socket, timeout=timeout)

    def raw_remote_socket(self, timeout: float | None = 30.0) -> socket.socket:
        """A connected (and, with TLS, handshaken) socket to the remote
        service, for byte-level tests."""
        s = socket.create_connection((self.host, self.port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            s = self.ssl_context().wrap_socket(s, server_hostname=self.host)
        return s

    def raw_local_socket(self, timeout: float | None = 30.0) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.local_socket)
        return s

    # -- process

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL as a fallback; return the exit code."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, no chance to clean up."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# --- configuration -----------------------------------------------------------


def _ovirt_imageio_conf(
    workdir: Path, pki, tls, host, port, local_addr, control, remove_timeout=None
) -> list[str]:
    conf_dir = workdir / "conf"
    (conf_dir / "conf.d").mkdir(parents=True, exist_ok=True)
    if tls:
        tls_section = (
            "enable = true\n"
            f"key_file = {pki.key_file}\n"
            f"cert_file = {pki.cert_file}\n"
            f"ca_file = {pki.ca_file}\n"
        )
    else:
        tls_section = "enable = false\n"
    if local_addr is None:
        local_section = "enable = false\n"
    else:
        # configparser keeps a literal NUL, which makes the address abstract.
        local_section = f"enable = true\nsocket = {local_addr}\n"
    text = (
        "[daemon]\n"
        "drop_privileges = false\n"
        "systemd_enable = false\n"
        f"run_dir = {workdir}\n"
        "\n[tls]\n" + tls_section + "\n[remote]\n"
        f"host = {host}\n"
        f"port = {port}\n"
        "\n[local]\n" + local_section + "\n[control]\n"
        "transport = unix\n"
        f"socket = {control}\n"
        + (f"remove_timeout = {remove_timeout}\n" if remove_timeout else "")
        +
        "\n[handlers]\nkeys = stderr\n"
        "\n[logger_root]\nlevel = INFO\nhandlers = stderr\n"
    )
    (conf_dir / "conf.d" / "daemon.conf").write_text(text)
    return [str(OVIRT_IMAGEIO), "--conf-dir", str(conf_dir)]


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def _diskferry_conf(
    workdir: Path, pki, tls, host, port, local_addr, control, remove_timeout=None,
    daemon_options=None, sections=None,
) -> list[str]:
    lines = [
        "[remote]",
        f"host = {_toml_str(host)}",
        f"port = {port}",
        "",
        "[tls]",
        f"enable = {'true' if tls else 'false'}",
    ]
    if tls:
        lines += [
            f"cert_file = {_toml_str(pki.cert_file)}",
            f"key_file = {_toml_str(pki.key_file)}",
            f"ca_file = {_toml_str(pki.ca_file)}",
        ]
    lines += ["", "[local]"]
    if local_addr is None:
        lines.append("enable = false")
    else:
        if local_addr.startswith("\0"):
            local_addr = "@" + local_addr[1:]
        lines += ["enable = true", f"socket = {_toml_str(local_addr)}"]
    lines += [
        "",
        "[control]",
        'transport = "unix"',
        f"socket = {_toml_str(control)}",
    ]
    if remove_timeout:
        lines.append(f"remove_timeout = {remove_timeout}")
    # Its own state and run folders: never the host's defaults, which a
    # daemon started by hand may hold.
    daemon_options = {"state_dir": str(workdir / ".diskferry"),
                      **(daemon_options or {})}
    lines += ["", "[daemon]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in daemon_options.items()]
    for section, options in (sections or {}).items():
        lines += ["", f"[{section}]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in options.items()]
    lines.append("")
    path = workdir / "diskferry.toml"
    path.write_text("\n".join(lines))
    return [sys.executable, "-m", "diskferry", "serve", "--config", str(path)]


# --- images ----------------------------------------------------------------


def make_sparse_file(path, size: int, chunks: dict[int, bytes] | None = None) -> Path:
    """A real sparse file of the given size, with data written at offsets;
    everything else is a hole."""
    path = Path(path)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in (chunks or {}).items():
            f.seek(offset)
            f.write(data)
    return path


def ticket_dict(path, size, ops=("read", "write"), **extra) -> dict:
    t = {
        "uuid": str(uuid.uuid4()),
        "size": size,
        "url": f"file://{os.fspath(path)}",
        "ops": list(ops),
        "timeout": 300,
    }
    t.update(extra)
    return t



# --- start -------------------------------------------------------------------


def _wait_ready(server: Server, deadline: float) -> None:
    last_error: Exception | None = None
    control_ok = False
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(
                f"{server.name} exited with {server.proc.returncode} while "
                f"starting; log:\n{server.log_text()}"
            )
        try:
            if not control_ok:
                server.control("GET", "/tickets/probe", timeout=2.0)
                control_ok = True
            with socket.create_connection((server.host, server.port), timeout=2.0):
                return
        except (OSError, http.client.HTTPException) as e:
            last_error = e
        time.sleep(0.05)
    raise RuntimeError(
        f"{server.name} not ready after {START_TIMEOUT}s "
        f"(last error: {last_error!r}); log:\n{server.log_text()}"
    )


def _query_local_socket(server: Server) -> str | None:
    """The local socket address as OPTIONS /images/* advertises it."""
    con = server.remote_connection(timeout=10)
    try:
        con.request("OPTIONS", "/images/*")
        res = con.getresponse()
        data = res.read()
        if res.status != 200:
            return None
        return json.loads(data).get("unix_socket")
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        con.close()


def start_server(
    kind: str,
    workdir: str | os.PathLike,
    *,
    tls: bool = True,
    local_socket: str | None = "abstract",
    host: str = "127.0.0.1",
    pki: PKI | None = None,
    remove_timeout: int | None = None,
    daemon_options: dict | None = None,
    sections: dict[str, dict] | None = None,
) -> Server:
    """Start a daemon of the given kind and wait until it serves.

    local_socket: "abstract" (a unique abstract address), "path" (a socket
    file in workdir) or None (local service disabled).
    remove_timeout: [control] remove_timeout, how long a ticket delete waits
    for ongoing operations (not one of the keys test harnesses set; only
    for tests of the 409 answer).
    daemon_options: diskferry only, options of its [daemon] section (limits
    under test: head_timeout, connection_limit).
    sections: diskferry only, other sections of its configuration, as
    {"backend_file": {"max_writers": 4}}.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown server kind {kind!r}")
    if local_socket not in ("abstract", "path", None):
        raise ValueError(f"bad local_socket {local_socket!r}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if tls and pki is None:
        pki = make_pki(workdir / "pki")

    tag = uuid.uuid4().hex[:12]
    if local_socket == "abstract":
        local_addr = f"\0/diskferry-test/{kind}/{tag}"
    elif local_socket == "path":
        local_addr = str(workdir / "local.sock")
    else:
        local_addr = None
    control = str(workdir / "control.sock")
    log_path = workdir / f"{kind}.log"

    configure = _ovirt_imageio_conf if kind == "ovirt-imageio" else _diskferry_conf
    if daemon_options or sections:
        if kind != "diskferry":
            raise ValueError("daemon_options and sections are diskferry's")
        configure = functools.partial(_diskferry_conf, daemon_options=daemon_options,
                                      sections=sections)

    attempts = 3
    for attempt in range(attempts):
        port = free_port(host)
        argv = configure(
            workdir, pki, tls, host, port, local_addr, control, remove_timeout
        )
        log = open(log_path, "ab")
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=workdir,
                start_new_session=True,
            )
        finally:
            log.close()
        scheme = "https" if tls else "http"
        url_host = f"[{host}]" if ":" in host else host
        server = Server(
            name=kind,
            url_base=f"{scheme}://{url_host}:{port}",
            ca_file=pki.ca_file if tls else None,
            control_socket=control,
            local_socket=local_addr,
            pid=proc.pid,
            log_path=str(log_path),
            workdir=str(workdir),
            host=host,
            port=port,
            tls=tls,
            proc=proc,
        )
        try:
            _wait_ready(server, time.monotonic() + START_TIMEOUT)
        except RuntimeError:
            server.stop()
            # Another process may have taken the port between free_port()
            # and bind(); try again with a new port.
            if attempt + 1 < attempts and "in use" in server.log_text():
                continue
            raise
        break

    if local_addr is not None:
        advertised = _query_local_socket(server)
        if advertised:
            server.local_socket = advertised
    return server


# --- raw HTTP ----------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def json(self):
        return json.loads(self.body)


class RawConnection:
    """Byte-level HTTP/1.1 on one socket: send exactly the bytes given,
    parse responses strictly (status line, headers, Content-Length body).

    Unlike http.client this never reconnects behind the caller's back, so
    tests can prove that many requests used one connection.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = b""

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            return False
        self._buf += chunk
        return True

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buf:
            if not self._fill():
                raise ConnectionError(f"EOF before {marker!r}; got {self._buf!r}")
        head, _, self._buf = self._buf.partition(marker)
        return head

    def _read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not self._fill():
                raise ConnectionError(
                    f"EOF after {len(self._buf)} of {n} body bytes"
                )
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def response(self, method: str = "GET") -> RawResponse:
        head = self._read_until(b"\r\n\r\n").decode("iso-8859-1")
        lines = head.split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1."):
            raise ValueError(f"bad status line {lines[0]!r}")
        code, _, reason = rest.partition(" ")
        headers = []
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if not sep:
                raise ValueError(f"bad header line {line!r}")
            headers.append((k.strip(), v.strip()))
        res = RawResponse(int(code), reason, headers, b"")
        status = res.status
        if status < 200 or status in (204, 304) or method == "HEAD":
            length = res.header("content-length")
            if length and int(length) and status >= 200 and method != "HEAD":
                res.body = self._read_exactly(int(length))
            return res
        length = res.header("content-length")
        if length is not None:
            res.body = self._read_exactly(int(length))
        else:
            while self._fill():
                pass
            res.body, self._buf = self._buf, b""
        return res

    def request(self, method: str, path: str, headers=None, body: bytes = b""):
        """Send a well-formed request and return the final response."""
        hdrs = {"Host": "localhost"}
        if body or method in ("PUT", "PATCH", "POST"):
            hdrs["Content-Length"] = str(len(body))
        hdrs.update(headers or {})
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in hdrs.items()
        )
        head = head.encode("latin-1") + b"\r\n"
        if len(body) <= 65536:
            # One write, so that no TCP small-packet delay is measured.
            head, body = head + body, b""
        self.send(head)
        if body:
            try:
                self.send(body)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                # The server may answer early (403, 416) and close without
                # reading the body; its answer is still readable.
                pass
        return self.response(method)

    def at_eof(self, timeout: float = 5.0) -> bool:
        """True if the peer closed the connection (no more bytes pending)."""
        if self._buf:
            return False
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            return not self._fill()
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return True
        finally:
            try:
                self.sock.settimeout(old)
            except OSError:
                pass


# --- a server through one transport ----------------------------------------


@dataclass
class Endpoint:
    """A server reached through one transport."""

    server: Server
    transport: str

    @property
    def name(self):
        return f"{self.server.name}-{self.transport}"

    def connect(self, timeout: float | None = 30.0) -> http.client.HTTPConnection:
        if self.transport == "tls":
            return self.server.remote_connection(timeout=timeout)
        return self.server.local_connection(timeout=timeout)

    def raw_socket(self, timeout: float | None = 30.0):
        if self.transport == "tls":
            return self.server.raw_remote_socket(timeout=timeout)
        return self.server.raw_local_socket(timeout=timeout)

    def raw(self, timeout: float | None = 30.0) -> RawConnection:
        return RawConnection(self.raw_socket(timeout=timeout))
