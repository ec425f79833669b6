"""Daemon configuration: TOML, every option defaulted.

Sections and names follow ovirt-imageio's ``daemon.conf`` where an option
means the same, so that an operator can carry a configuration over.
With no file at all the daemon runs from well-known folders (see
``places``): its lock and control socket in the run folder, and a CA and
server certificate generated in the state folder on first start.

A configuration is read from files merged in order, each overriding what
the previous set: ``--config FILE`` first, then ``DIR/conf.d/*.toml`` of
``--conf-dir DIR`` in name order (as ovirt-imageio's ``conf.d``), so that
a package's file and a host's own drop-ins can live side by side.

Each section is a dataclass; a new section is one more dataclass and one
more field of ``Config``: loading, checking types and printing
(``serve --show-config``) follow the fields.

See docs/configuration.md for every option.
"""

import copy
import dataclasses
import glob
import os
import tomllib
from dataclasses import dataclass, field
from typing import TypeAlias

from diskferry.daemon import places, tomlwrite
from diskferry.daemon.http.connection import HEAD_TIMEOUT
from diskferry.daemon.http.limits import (
    DEFAULT_CONNECTION_LIMIT,
    DEFAULT_LOCAL_RESERVE,
    DEFAULT_PENDING_LIMIT,
)
from diskferry.daemon.tickets import DEFAULT_INACTIVITY_TIMEOUT, DEFAULT_REMOVE_TIMEOUT
from diskferry.errors import DiskferryError
from diskferry.sockaddr import kernel_address

#: A file name, as a command line, a configuration or pathlib gives it.
FileName: TypeAlias = str | os.PathLike[str]


class ConfigError(DiskferryError):
    """Raised when the configuration file is unreadable or invalid."""


@dataclass
class Daemon:
    #: Most connections per image: caps the max_readers/max_writers that
    #: OPTIONS advertises.
    max_connections: int = 8
    #: Seconds an idle client connection is kept when its ticket has no
    #: inactivity_timeout of its own.
    inactivity_timeout: int = DEFAULT_INACTIVITY_TIMEOUT
    #: Where the lock and the control socket go (default: see places).
    run_dir: str = ""
    #: Where generated certificates go (default: see places).
    state_dir: str = ""
    #: Seconds running requests get to finish when the daemon stops.
    shutdown_timeout: int = 30
    #: Client connections open at once on the images services (remote and
    #: local together; the control service has as many of its own);
    #: more are answered 503 with Retry-After and closed.
    connection_limit: int = DEFAULT_CONNECTION_LIMIT
    #: Connections of connection_limit that only the local socket may use
    #: (at most half of it), so that remote peers can never lock local
    #: clients out.
    local_reserve: int = DEFAULT_LOCAL_RESERVE
    #: Connections per service that may wait for their TLS handshake or
    #: first request head at once; past it the oldest is closed.
    pending_limit: int = DEFAULT_PENDING_LIMIT
    #: Seconds a client has to send a whole request head.
    head_timeout: int = int(HEAD_TIMEOUT)


@dataclass
class Tls:
    enable: bool = True
    #: Empty: generated under STATE_DIR/pki on first start.
    key_file: str = ""
    cert_file: str = ""
    ca_file: str = ""


@dataclass
class Remote:
    host: str = "127.0.0.1"
    port: int = 54322


@dataclass
class Local:
    enable: bool = True
    #: "@name" or "\0name": abstract address; anything else: a path.
    socket: str = "\0/org/ovirt/imageio"


@dataclass
class Control:
    #: "unix" (socket file, mode 0660) or "tcp" (localhost only).
    transport: str = "unix"
    #: Default: RUN_DIR/control.sock.
    socket: str = ""
    port: int = 54324
    #: Seconds DELETE /tickets/{id} waits for running requests before 409.
    remove_timeout: int = DEFAULT_REMOVE_TIMEOUT


@dataclass
class BackendFile:
    #: Bytes per read or write when data is copied through a buffer.
    buffer_size: int = 8 * 1024**2
    #: Open images with O_DIRECT (bypass the host page cache).
    direct: bool = False
    #: Connections that may write one regular file at once (OPTIONS
    #: ``max_writers``, capped by ``[daemon] max_connections``); a block
    #: device takes as many writers as readers, as ovirt-imageio does.
    max_writers: int = 1


@dataclass
class BackendNbd:
    #: Bytes per HTTP-side read or write of an NBD image; the NBD client
    #: splits it at the server's maximum payload and pipelines the parts.
    buffer_size: int = 8 * 1024**2


#: Values of ``[logging] level`` (in any case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass
class BackendHttp:
    #: CA certificates that verify https:// upstream servers of proxy
    #: tickets (default: [tls] ca_file, else the system's CAs).
    ca_file: str = ""
    #: Seconds to connect to an upstream server and finish the TLS
    #: handshake.
    connect_timeout: int = 10
    #: Seconds to wait for each read or write on an upstream connection,
    #: including the server's answer after it wrote a request to storage.
    read_timeout: int = 60
    #: Bytes per request forwarded upstream (a quarter of it: the buffer
    #: is cut into slots that move at once).
    buffer_size: int = 8 * 1024**2


@dataclass
class Logging:
    level: str = "INFO"


@dataclass
class Metrics:
    """``GET /metrics`` is always on the control service; this section
    adds a port of its own (plain HTTP, for a scraper on the network)
    and per-transfer series."""

    #: Serve /metrics on HOST:PORT too.
    enable: bool = False
    #: Where it listens: this host only, unless set otherwise.
    host: str = "localhost"
    port: int = 54325
    #: Series per transfer, labeled with the ticket's ``transfer_id``
    #: (tickets without one are only counted): one series per transfer,
    #: so only where transfers are few.
    transfer_labels: bool = False


#: Any section of a configuration.
Section: TypeAlias = (Daemon | Tls | Remote | Local | Control | BackendFile
                      | BackendNbd | BackendHttp | Logging | Metrics)


@dataclass
class Config:
    daemon: Daemon = field(default_factory=Daemon)
    tls: Tls = field(default_factory=Tls)
    remote: Remote = field(default_factory=Remote)
    local: Local = field(default_factory=Local)
    control: Control = field(default_factory=Control)
    backend_file: BackendFile = field(default_factory=BackendFile)
    backend_nbd: BackendNbd = field(default_factory=BackendNbd)
    backend_http: BackendHttp = field(default_factory=BackendHttp)
    logging: Logging = field(default_factory=Logging)
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def state_place(self) -> places.Place:
        return places.state_dir(self.daemon.state_dir, os.environ,
                                os.geteuid())

    @property
    def run_place(self) -> places.Place:
        return places.run_dir(self.daemon.run_dir, self.state_place,
                              os.environ, os.geteuid())

    @property
    def state_dir(self) -> str:
        return self.state_place.path

    @property
    def run_dir(self) -> str:
        return self.run_place.path

    @property
    def control_socket(self) -> str:
        return self.control.socket or os.path.join(self.run_dir,
                                                   "control.sock")

    def control_socket_origin(self) -> str:
        """Why ``control_socket`` is where it is, for a message."""
        if self.control.socket:
            return "[control] socket"
        return f"control.sock in {self.run_place.origin}"

    @property
    def local_socket(self) -> str:
        """The local address with an abstract name spelled with NUL."""
        return kernel_address(self.local.socket)


def sections(config: Config) -> list[tuple[str, Section]]:
    """(name, section) of every section, in the order of ``Config``."""
    return [(f.name, getattr(config, f.name))
            for f in dataclasses.fields(config)]


def effective(config: Config) -> Config:
    """A copy of ``config`` with the folders and the control socket it
    would use written out: what ``serve --show-config`` prints."""
    written = copy.deepcopy(config)
    written.daemon.state_dir = config.state_dir
    written.daemon.run_dir = config.run_dir
    if config.control.transport == "unix":
        written.control.socket = config.control_socket
    return written


def dumps(config: Config) -> str:
    """``config`` as TOML text that ``load`` reads back to an equal one."""
    return tomlwrite.dumps({name: dataclasses.asdict(section)
                            for name, section in sections(config)})


def files(path: FileName | None = None,
          conf_dir: str | None = None) -> list[FileName]:
    """The files a configuration is read from, in the order applied."""
    found: list[FileName] = [path] if path is not None else []
    if conf_dir is not None:
        # A mistyped folder fails; a folder without drop-ins (yet) is
        # the defaults, as a freshly installed package has it.
        if not os.path.isdir(conf_dir):
            raise ConfigError(f"Cannot read {conf_dir}: not a directory")
        folder = os.path.join(glob.escape(conf_dir), "conf.d")
        found += sorted(glob.glob(os.path.join(folder, "*.toml")))
    return found


def load(path: FileName | None = None, conf_dir: str | None = None) -> Config:
    """The defaults, overridden by ``path`` and then by the drop-ins of
    ``conf_dir`` (``conf.d/*.toml``, in name order)."""
    config = Config()
    names = files(path, conf_dir)
    for name in names:
        _apply_file(config, name)
    _check(", ".join(map(str, names)) or "defaults", config)
    return config


def _apply_file(config: Config, path: FileName) -> None:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"Cannot read {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"Invalid TOML in {path}: {e}") from e
    for section_name, values in data.items():
        section = getattr(config, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            raise ConfigError(f"{path}: unknown section [{section_name}]")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: [{section_name}] must be a table")
        _apply(path, section_name, section, values)


def _apply(path: FileName, section_name: str, section: Section,
           values: dict[str, object]) -> None:
    fields = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{path}: unknown option {key!r} in "
                              f"[{section_name}]")
        expected = type(getattr(section, key))
        if expected is int and isinstance(value, bool) or \
                not isinstance(value, expected):
            raise ConfigError(
                f"{path}: [{section_name}] {key} must be "
                f"{expected.__name__}, got {value!r}")
        setattr(section, key, value)


def _check(path: str, config: Config) -> None:
    if config.control.transport not in ("unix", "tcp"):
        raise ConfigError(f"{path}: [control] transport must be 'unix' or "
                          f"'tcp', got {config.control.transport!r}")
    for name in ("backend_file", "backend_nbd"):
        size = getattr(config, name).buffer_size
        if size < 4096 or size % 4096:
            raise ConfigError(f"{path}: [{name}] buffer_size must be a "
                              f"multiple of 4096")
    for name, value in (
            ("[daemon] connection_limit", config.daemon.connection_limit),
            ("[daemon] head_timeout", config.daemon.head_timeout),
            ("[daemon] pending_limit", config.daemon.pending_limit),
            ("[backend_file] max_writers", config.backend_file.max_writers)):
        if value < 1:
            raise ConfigError(f"{path}: {name} must be at least 1")
    if config.daemon.local_reserve < 0:
        raise ConfigError(f"{path}: [daemon] local_reserve must be at "
                          f"least 0")
    for name, value in (("[remote] port", config.remote.port),
                        ("[control] port", config.control.port),
                        ("[metrics] port", config.metrics.port)):
        if not 0 <= value <= 65535:
            raise ConfigError(f"{path}: {name} must be 0-65535")
    if config.logging.level.upper() not in LOG_LEVELS:
        raise ConfigError(f"{path}: [logging] level must be one of "
                          f"{', '.join(LOG_LEVELS)}, got "
                          f"{config.logging.level!r}")
