"""Where the daemon keeps its state and its run-time files when not told.

The defaults do not depend on the current directory, so that a daemon
and ``diskferry ticket`` run from any folder agree on the control socket
and a host has one CA, not one per folder a daemon was started in:

    state (CA, server certificate)       run (lock, control socket)
    $DISKFERRY_STATE_DIR                  STATE_DIR/run
    $STATE_DIRECTORY (systemd)            $RUNTIME_DIRECTORY (systemd)
    /var/lib/diskferry (root)             /run/diskferry (root)
    $XDG_STATE_HOME/diskferry             $XDG_RUNTIME_DIR/diskferry
    ~/.local/state/diskferry              STATE_DIR/run

The first that applies wins. An explicit state folder
(``[daemon] state_dir`` or ``$DISKFERRY_STATE_DIR``) keeps the run files
inside it too, so that two daemons given two state folders never share a
lock or a control socket. Each answer carries the reason it was chosen:
``diskferry ticket`` prints it when the socket cannot be reached.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

#: Folder name under the systemd, FHS and XDG base folders.
NAME = "diskferry"


@dataclass(frozen=True)
class Place:
    """A folder and why it is the one (for messages)."""

    path: str
    origin: str


def state_dir(configured: str, environ: Mapping[str, str],
              euid: int) -> Place:
    """The state folder: ``configured`` ([daemon] state_dir) or a default."""
    xdg = environ.get("XDG_STATE_HOME")
    home = environ.get("HOME") or os.path.expanduser("~")
    return _first_of([
        (configured, "[daemon] state_dir"),
        (environ.get("DISKFERRY_STATE_DIR"), "$DISKFERRY_STATE_DIR"),
        (_first(environ.get("STATE_DIRECTORY")), "$STATE_DIRECTORY (systemd)"),
        (f"/var/lib/{NAME}" if euid == 0 else None,
         "the default state folder for root"),
        (xdg and os.path.join(xdg, NAME), f"$XDG_STATE_HOME/{NAME}"),
        (os.path.join(home, ".local", "state", NAME),
         f"~/.local/state/{NAME} ($XDG_STATE_HOME unset)"),
    ])


def run_dir(configured: str, state: Place, environ: Mapping[str, str],
            euid: int) -> Place:
    """The run folder: ``configured`` ([daemon] run_dir) or a default
    that follows ``state`` when the state folder was given explicitly."""
    explicit = state.origin in ("[daemon] state_dir", "$DISKFERRY_STATE_DIR")
    xdg = environ.get("XDG_RUNTIME_DIR")
    inside = os.path.join(state.path, "run")
    return _first_of([
        (configured, "[daemon] run_dir"),
        (inside if explicit else None, f"{state.origin}/run"),
        (_first(environ.get("RUNTIME_DIRECTORY")),
         "$RUNTIME_DIRECTORY (systemd)"),
        (f"/run/{NAME}" if euid == 0 else None,
         "the default run folder for root"),
        (xdg and os.path.join(xdg, NAME), f"$XDG_RUNTIME_DIR/{NAME}"),
        (inside, f"{state.origin}/run ($XDG_RUNTIME_DIR unset)"),
    ])


def _first_of(candidates: list[tuple[str | None, str]]) -> Place:
    """The first candidate folder that is set, made absolute."""
    for path, origin in candidates:
        if path:
            return Place(os.path.abspath(path), origin)
    raise AssertionError("the last candidate is always set")


def _first(value: str | None) -> str:
    """The first of systemd's colon separated folders, or ""."""
    return (value or "").split(":", 1)[0]
