"""The daemon: three services over one ticket store, and a clean stop.

    remote  (TCP + TLS)     images API   clients on other hosts
    local   (UNIX socket)   images API   clients on this host
    control (UNIX or TCP)   tickets API  the management plane

``Daemon.start()`` first takes the run directory's lock (one daemon per
run directory, see ``instancelock``), then binds every listener before
making anything else (the TLS certificates of a first start included)
and before serving any, so that an address in use fails the start
rather than leaving half a daemon, or a CA that no daemon serves with,
in a new state folder. Whatever fails, the daemon removes only what it created
itself: the socket files it bound (checked by inode, so a file another
daemon bound at the same path since is left alone) and its lock file.
A bind error names the service, the address and the cause in one line.
"""

import errno
import logging
import os
import socket
import ssl
import threading
import uuid
from dataclasses import dataclass
from typing import Protocol

from diskferry import __version__
from diskferry.daemon import backends
from diskferry.daemon.backup.manager import BackupManager
from diskferry.daemon.config import Config, FileName
from diskferry.daemon.exports import ExportManager
from diskferry.daemon.handlers import control_app, images_app, metrics_app
from diskferry.daemon.handlers.backups import backup_routes
from diskferry.daemon.http.limits import ConnectionLimit
from diskferry.daemon.http.listener import tcp_listener, unix_listener
from diskferry.daemon.http.server import Server
from diskferry.daemon.instancelock import InstanceLock
from diskferry.daemon.metrics.registry import DaemonMetrics, MetricsSettings
from diskferry.daemon.tickets import TicketStore
from diskferry.errors import DiskferryError
from diskferry.hostid import host_id
from diskferry.sockaddr import display_address, is_abstract, kernel_address

log = logging.getLogger("diskferry.daemon.service")

#: Mode of the control socket: the management plane's group may use it.
CONTROL_SOCKET_MODE = 0o660

#: Connections open at once on the metrics port: a scraper or two need
#: one each; more only cost threads.
METRICS_CONNECTION_LIMIT = 16


class StartError(DiskferryError):
    """Raised when the daemon cannot start; the message says what and why."""


class BindError(StartError):
    """Raised when a service cannot listen on its address."""

    def __init__(self, service: str, address: str, error: OSError) -> None:
        super().__init__(f"{service} service: {address} {_bind_cause(error)}")
        self.service = service
        self.address = address


def _bind_cause(error: OSError) -> str:
    if isinstance(error, socket.gaierror):
        return f"cannot be resolved: {error.strerror}"
    code = error.errno
    if code == errno.EADDRINUSE:
        detail = error.strerror
        if detail and detail != os.strerror(errno.EADDRINUSE):
            return f"is in use: {detail} (another daemon?)"
        return "is in use (another daemon?)"
    if code == errno.EEXIST:
        return "exists and is not a socket (left alone)"
    if code == errno.EADDRNOTAVAIL:
        return "is not an address of this host"
    if code in (errno.EACCES, errno.EPERM):
        return "cannot be bound: permission denied"
    return f"cannot be bound: {error.strerror or error}"


def _tcp_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tls_context(cert_file: FileName, key_file: FileName) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except OSError as e:
        # FileNotFoundError names no file; ssl.SSLError names neither.
        cause = getattr(e, "reason", None) or e.strerror or e
        raise StartError(f"TLS: cannot load certificate {cert_file} with "
                         f"key {key_file}: {cause}") from e
    return ctx


class Service(Protocol):
    """What the daemon uses of a running service (an HTTP server)."""

    name: str
    sock: socket.socket
    #: Where it listens, printable.
    address: str

    def start(self) -> None: ...

    def stop(self, timeout: float) -> None: ...


@dataclass(frozen=True)
class _Listeners:
    """The services' listening sockets, bound before anything is made."""

    remote: socket.socket
    local: socket.socket | None
    control: socket.socket
    #: The metrics' own port, when ``[metrics] enable``.
    metrics: socket.socket | None = None

    def sockets(self) -> list[socket.socket]:
        return [sock for sock in (self.remote, self.local, self.control,
                                  self.metrics) if sock is not None]


class Daemon:

    def __init__(self, config: Config) -> None:
        self.config = config
        self.exports = ExportManager(config)
        self.backups = BackupManager(config.run_dir, self.exports.start_export,
                                     self.exports.serve)
        self.store = TicketStore(
            backends.check_url,
            remove_timeout=config.control.remove_timeout,
            default_inactivity=config.daemon.inactivity_timeout,
            start_export=self.backups.start_export)
        self.metrics = DaemonMetrics(self.store, MetricsSettings(
            transfer_labels=config.metrics.transfer_labels))
        self.server_id = uuid.uuid4().hex
        self.servers: list[Service] = []
        self.ca_file: FileName | None = None
        self.lock = InstanceLock(config.run_dir)
        # Socket files this daemon bound: path -> (st_dev, st_ino).
        self._socket_files: dict[str, tuple[int, int]] = {}
        self._stopped = threading.Event()

    def start(self) -> None:
        config = self.config
        try:
            os.makedirs(config.run_dir, exist_ok=True)
        except OSError as e:
            raise StartError(f"run directory {config.run_dir}: "
                             f"{e.strerror}") from e
        # Before anything else: a second daemon with this run directory
        # stops here, having touched nothing of the first.
        try:
            self.lock.acquire()
        except OSError as e:
            raise StartError(f"lock {self.lock.path}: {e.strerror}") from e
        try:
            self._start()
        except BaseException:
            self.exports.close()
            self.lock.release()
            raise

    def _start(self) -> None:
        listeners = self._bind()
        try:
            # Only now that every address is ours: a daemon that cannot
            # listen must not have made a CA in its state folder first,
            # nor its exports' folder.
            context = self._tls_context()
            self.exports.open(self.store.stop_idle_exports)
            self.backups.open(self.store)
            self.servers = self._servers(listeners, context)
        except BaseException:
            self._unbind(listeners.sockets())
            raise
        for server in self.servers:
            server.start()

    def _bind(self) -> _Listeners:
        """Every service's listening socket, or none: a bind that fails
        closes those bound before it."""
        config = self.config
        bound: list[socket.socket] = []
        try:
            remote = self._tcp("remote", config.remote.host,
                               config.remote.port)
            bound.append(remote)
            local = None
            if config.local.enable:
                local = self._unix("local", config.local_socket)
                bound.append(local)
            control = self._control_socket()
            bound.append(control)
            metrics = None
            if config.metrics.enable:
                metrics = self._tcp("metrics", config.metrics.host,
                                    config.metrics.port)
        except BaseException:
            self._unbind(bound)
            raise
        return _Listeners(remote, local, control, metrics)

    def _unbind(self, sockets: list[socket.socket]) -> None:
        """Undo ``_bind`` for a start that fails."""
        for sock in sockets:
            sock.close()
        self._remove_socket_files()

    def _tls_context(self) -> ssl.SSLContext | None:
        if not self.config.tls.enable:
            return None
        return tls_context(*self._tls_files())

    def _servers(self, listeners: _Listeners,
                 context: ssl.SSLContext | None) -> list[Service]:
        config = self.config
        images = images_app(self.store, config, self._options(),
                            self._ticket_options())
        idle = config.daemon.inactivity_timeout
        head = config.daemon.head_timeout
        # Image clients share one limit, of which remote peers cannot take
        # the local socket's reserve; the control service has its own, so
        # that they can never lock the management plane out.
        clients = ConnectionLimit(config.daemon.connection_limit,
                                  reserved=config.daemon.local_reserve)
        pending = config.daemon.pending_limit
        servers: list[Service] = [Server(
            "remote", listeners.remote, images, tls_context=context,
            idle_timeout=idle, head_timeout=head, limit=clients.share(),
            pending_limit=pending,
            observer=self.metrics.service(
                "remote", "tls" if context else "tcp"))]
        if listeners.local is not None:
            servers.append(Server(
                "local", listeners.local, images, idle_timeout=idle,
                head_timeout=head, limit=clients.share(reserved=True),
                pending_limit=pending,
                observer=self.metrics.service("local", "unix")))
        servers.append(Server(
            "control", listeners.control,
            control_app(self.store, self.metrics,
                        backup_routes(self.backups, lambda: self.url)),
            idle_timeout=idle, head_timeout=head,
            limit=ConnectionLimit(config.daemon.connection_limit).share(),
            pending_limit=pending,
            observer=self.metrics.service(
                "control", config.control.transport)))
        if listeners.metrics is not None:
            servers.append(Server(
                "metrics", listeners.metrics, metrics_app(self.metrics),
                idle_timeout=idle, head_timeout=head,
                limit=ConnectionLimit(METRICS_CONNECTION_LIMIT).share(),
                pending_limit=pending,
                observer=self.metrics.service("metrics", "tcp")))
        return servers

    def _options(self) -> dict[str, str]:
        """What OPTIONS tells every client."""
        if self.config.local.enable:
            return {"unix_socket": self.config.local_socket}
        return {}

    def _ticket_options(self) -> dict[str, str]:
        """What OPTIONS tells only a client that holds a valid ticket."""
        options = {"server_id": self.server_id}
        if (this_host := host_id()) is not None:
            options["host_id"] = this_host
        return options

    def _control_socket(self) -> socket.socket:
        control = self.config.control
        if control.transport == "unix":
            return self._unix("control", self.config.control_socket,
                              mode=CONTROL_SOCKET_MODE)
        return self._tcp("control", "localhost", control.port)

    def _tcp(self, service: str, host: str, port: int) -> socket.socket:
        try:
            return tcp_listener(host, port)
        except OSError as e:
            raise BindError(service, _tcp_address(host, port), e) from e

    def _unix(self, service: str, address: str,
              mode: int | None = None) -> socket.socket:
        try:
            sock = unix_listener(address, mode=mode)
        except OSError as e:
            raise BindError(service, display_address(address), e) from e
        if not is_abstract(address):
            try:
                st = os.lstat(address)
            except OSError:
                # Gone already: there is nothing of ours to remove later.
                pass
            else:
                self._socket_files[address] = (st.st_dev, st.st_ino)
        return sock

    def _tls_files(self) -> tuple[FileName, FileName]:
        tls = self.config.tls
        if tls.cert_file and tls.key_file:
            self.ca_file = tls.ca_file or None
            return tls.cert_file, tls.key_file
        from diskferry.daemon.pki import ensure_pki
        pki = ensure_pki(os.path.join(self.config.state_dir, "pki"),
                         hostnames=("localhost", socket.gethostname()),
                         ips=("127.0.0.1", "::1"))
        self.ca_file = pki.ca_file
        return pki.cert_file, pki.key_file

    def server(self, name: str) -> Service | None:
        for server in self.servers:
            if server.name == name:
                return server
        return None

    def _started(self, name: str) -> Service:
        server = self.server(name)
        if server is None:
            raise RuntimeError(f"no {name} service: the daemon is not started")
        return server

    @property
    def url(self) -> str:
        """Base URL of the images API on the remote service."""
        remote = self._started("remote")
        scheme = "https" if self.config.tls.enable else "http"
        port = remote.sock.getsockname()[1]
        host = self.config.remote.host
        if host in ("", "::", "0.0.0.0", "127.0.0.1", "::1"):
            host = "localhost"
        return f"{scheme}://{host}:{port}/images/"

    def describe(self) -> list[str]:
        """Lines telling a user where everything is."""
        lines = [f"diskferry {__version__} serving"]
        lines.append(f"  images URL:     {self.url}{{ticket-id}}")
        if self.ca_file:
            lines.append(f"  CA file:        {self.ca_file}")
        local = self.server("local")
        if local:
            lines.append(f"  local socket:   {local.address}")
        control = self._started("control")
        lines.append(f"  control socket: {control.address}")
        metrics = self.server("metrics")
        if metrics:
            lines.append(f"  metrics:        http://{metrics.address}/metrics")
        return lines

    def wait(self) -> None:
        self._stopped.wait()

    def request_stop(self) -> None:
        self._stopped.set()

    def stop(self) -> None:
        timeout = self.config.daemon.shutdown_timeout
        threads = [threading.Thread(target=s.stop, args=(timeout,))
                   for s in self.servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.store.stop_exports()
        self.backups.stop_all()
        self.exports.close()
        self._remove_socket_files()
        self.lock.release()
        self._stopped.set()

    def _remove_socket_files(self) -> None:
        """Remove the socket files this daemon bound, and only those: a
        path now naming another file (another daemon bound it since) is
        left alone."""
        files, self._socket_files = self._socket_files, {}
        for path, identity in files.items():
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) != identity:
                log.warning("not removing %s: no longer the socket this "
                            "daemon bound", path)
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def notify_systemd(state: str) -> None:
    """Tell systemd (Type=notify) our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), kernel_address(address))
