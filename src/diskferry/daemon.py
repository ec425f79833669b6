"""The daemon: three services over one ticket store, and a clean stop.

    remote  (TCP + TLS)     images API   clients on other hosts
    local   (UNIX socket)   images API   clients on this host
    control (UNIX or TCP)   tickets API  the management plane

``Daemon.start()`` binds every listener before serving any, so that a
port in use fails the start rather than leaving half a daemon.
"""

import logging
import os
import socket
import ssl
import threading
import uuid

from diskferry import __version__
from diskferry.handlers import control_app, images_app
from diskferry.hostid import host_id
from diskferry.http.listener import is_abstract, tcp_listener, unix_listener
from diskferry.http.server import ConnectionLimit, Server
from diskferry.tickets import TicketStore

log = logging.getLogger("diskferry.daemon")

#: Mode of the control socket: the management plane's group may use it.
CONTROL_SOCKET_MODE = 0o660


def tls_context(cert_file, key_file):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class Daemon:

    def __init__(self, config):
        self.config = config
        self.store = TicketStore(
            remove_timeout=config.control.remove_timeout,
            default_inactivity=config.daemon.inactivity_timeout)
        self.server_id = uuid.uuid4().hex
        self.servers = []
        self.ca_file = None
        self._stopped = threading.Event()

    def start(self):
        config = self.config
        os.makedirs(config.run_dir, exist_ok=True)
        options = {"host_id": host_id(), "server_id": self.server_id}
        if options["host_id"] is None:
            del options["host_id"]
        if config.local.enable:
            options["unix_socket"] = config.local_socket
        images = images_app(self.store, config, options)
        idle = config.daemon.inactivity_timeout
        # Image clients share one limit; the control service has its own,
        # so that they can never lock the management plane out.
        clients = ConnectionLimit(config.daemon.connection_limit)
        limits = {"idle_timeout": idle, "limit": clients,
                  "head_timeout": config.daemon.head_timeout}
        try:
            context = None
            if config.tls.enable:
                cert_file, key_file = self._tls_files()
                context = tls_context(cert_file, key_file)
            self.servers.append(Server(
                "remote", tcp_listener(config.remote.host, config.remote.port),
                images, tls_context=context, **limits))
            if config.local.enable:
                self.servers.append(Server(
                    "local", unix_listener(config.local_socket), images,
                    **limits))
            if config.control.transport == "unix":
                control_sock = unix_listener(config.control_socket,
                                             mode=CONTROL_SOCKET_MODE)
            else:
                control_sock = tcp_listener("localhost", config.control.port)
            self.servers.append(Server(
                "control", control_sock, control_app(self.store),
                idle_timeout=idle, head_timeout=config.daemon.head_timeout,
                limit=ConnectionLimit(config.daemon.connection_limit)))
        except BaseException:
            for server in self.servers:
                server.sock.close()
            self._remove_socket_files()
            raise
        for server in self.servers:
            server.start()

    def _tls_files(self):
        tls = self.config.tls
        if tls.cert_file and tls.key_file:
            self.ca_file = tls.ca_file or None
            return tls.cert_file, tls.key_file
        from diskferry.pki import ensure_pki
        pki = ensure_pki(os.path.join(self.config.state_dir, "pki"),
                         hostnames=("localhost", socket.gethostname()),
                         ips=("127.0.0.1", "::1"))
        self.ca_file = pki.ca_file
        return pki.cert_file, pki.key_file

    def server(self, name):
        for server in self.servers:
            if server.name == name:
                return server
        return None

    @property
    def url(self):
        """Base URL of the images API on the remote service."""
        remote = self.server("remote")
        scheme = "https" if self.config.tls.enable else "http"
        port = remote.sock.getsockname()[1]
        host = self.config.remote.host
        if host in ("", "::", "0.0.0.0", "127.0.0.1", "::1"):
            host = "localhost"
        return f"{scheme}://{host}:{port}/images/"

    def describe(self):
        """Lines telling a user where everything is."""
        lines = [f"diskferry {__version__} serving"]
        lines.append(f"  images URL:     {self.url}{{ticket-id}}")
        if self.ca_file:
            lines.append(f"  CA file:        {self.ca_file}")
        local = self.server("local")
        if local:
            lines.append(f"  local socket:   {local.address}")
        control = self.server("control")
        lines.append(f"  control socket: {control.address}")
        return lines

    def wait(self):
        self._stopped.wait()

    def request_stop(self):
        self._stopped.set()

    def stop(self):
        timeout = self.config.daemon.shutdown_timeout
        threads = [threading.Thread(target=s.stop, args=(timeout,))
                   for s in self.servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._remove_socket_files()
        self._stopped.set()

    def _remove_socket_files(self):
        paths = [self.config.control_socket] \
            if self.config.control.transport == "unix" else []
        if self.config.local.enable:
            paths.append(self.config.local_socket)
        for path in paths:
            if not is_abstract(path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass


def notify_systemd(state):
    """Tell systemd (Type=notify) our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)
