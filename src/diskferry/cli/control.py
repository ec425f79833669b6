"""The daemon's control socket, as ``diskferry ticket`` reaches it.

The socket is found as ``diskferry serve`` binds it, whatever the
current folder: ``--socket``, else the configuration (``--config``,
``--conf-dir``), else the default run folder. A failure names where it
looked and why there, since the usual cause is a daemon started with
another configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

from diskferry.errors import DiskferryError

#: Seconds to wait for the control service: a DELETE waits for running
#: requests to end ([control] remove_timeout, 60 s by default).
TIMEOUT = 120

#: A JSON value as the control service sends and takes it.
JSON = dict[str, object] | list[object] | str | int | float | bool | None


class ControlError(Exception):
    """Raised when the control service cannot be reached or answers with
    an error."""


#: Options every action of "ticket" and "backup" takes, after the command
#: or after the action ("ticket add --config F" as well as "ticket
#: --config F add"). SUPPRESS keeps an action's parser from overwriting a
#: value given before it.
CONNECTION_OPTIONS = argparse.ArgumentParser(add_help=False)
CONNECTION_OPTIONS.add_argument(
    "--config", metavar="FILE", default=argparse.SUPPRESS,
    help="the daemon's TOML configuration")
CONNECTION_OPTIONS.add_argument(
    "--conf-dir", metavar="DIR", default=argparse.SUPPRESS,
    help="the daemon's configuration folder (DIR/conf.d/*.toml)")
CONNECTION_OPTIONS.add_argument(
    "--socket", metavar="PATH", default=argparse.SUPPRESS,
    help="control socket (overrides the configuration)")


@dataclass(frozen=True)
class ControlSocket:
    """Where the control socket is, and which rule put it there."""

    path: str
    origin: str

    @classmethod
    def find(cls, args: argparse.Namespace) -> ControlSocket:
        """The socket ``diskferry serve`` with the same options binds."""
        from diskferry.daemon import config as config_mod

        socket_path: str | None = getattr(args, "socket", None)
        if socket_path is not None:
            return cls(socket_path, "--socket")
        config = config_mod.load(getattr(args, "config", None),
                                 getattr(args, "conf_dir", None))
        if config.control.transport != "unix":
            raise ControlError("the daemon's control service is on TCP "
                               "([control] transport); this command speaks "
                               "to a UNIX socket only: give --socket")
        return cls(config.control_socket, config.control_socket_origin())

    def request(self, method: str, path: str,
                body: JSON = None) -> bytes:
        """The body of the answer to ``method path``; ControlError if it
        is an error."""
        from diskferry.client.uhttp import UnixHTTPConnection

        con = UnixHTTPConnection(self.path, timeout=TIMEOUT)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload else {}
            try:
                con.request(method, path, body=payload, headers=headers)
            except OSError as e:
                raise ControlError(self._unreachable(e)) from e
            res = con.getresponse()
            data = res.read()
        finally:
            con.close()
        if res.status >= 400:
            raise ControlError(f"{res.status} {res.reason}: "
                               f"{data.decode(errors='replace').strip()}")
        return data

    def _unreachable(self, error: OSError) -> str:
        return (f"cannot reach the control socket {self.path} "
                f"({self.origin}): {error.strerror or error}; is the daemon "
                f"running? Give --socket, or the daemon's --config or "
                f"--conf-dir")


#: A command's work on the control socket, and what argparse runs.
ControlAction = Callable[[argparse.Namespace, ControlSocket], None]
Action = Callable[[argparse.Namespace], int]


def on_control_socket(command: str) -> Callable[[ControlAction], Action]:
    """Run a ``diskferry COMMAND`` action with the control socket found,
    its failures told as one line: status 2 for a configuration error, 1
    for a failed request."""
    def decorate(func: ControlAction) -> Action:
        def wrapper(args: argparse.Namespace) -> int:
            from diskferry.daemon.config import ConfigError

            try:
                func(args, ControlSocket.find(args))
            except ConfigError as e:
                print(f"diskferry {command}: {e}", file=sys.stderr)
                return 2
            except (ControlError, DiskferryError) as e:
                print(f"diskferry {command}: {e}", file=sys.stderr)
                return 1
            return 0
        return wrapper
    return decorate
