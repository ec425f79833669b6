"""``diskferry serve``: run the daemon in the foreground."""

import argparse
import logging
import signal
import sys

from diskferry.cli.arguments import Subparsers

EPILOG = """\
examples:
  diskferry serve                       embedded defaults
  diskferry serve --config /etc/diskferry/daemon.toml
  diskferry serve --conf-dir /etc/diskferry      /etc/diskferry/conf.d/*.toml
  diskferry serve --show-config > daemon.toml    the effective configuration

With no configuration the daemon listens on https://127.0.0.1:54322,
generates a CA and server certificate under its state folder
(/var/lib/diskferry for root, ~/.local/state/diskferry for a user, or
$DISKFERRY_STATE_DIR), puts its control socket in its run folder
(/run/diskferry for root, $XDG_RUNTIME_DIR/diskferry for a user) and
prints where everything is. Stop it with Ctrl-C or SIGTERM: running
requests get time to finish.
"""


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="run the daemon in the foreground",
        description="Run the diskferry daemon: images API over TLS and a "
                    "local UNIX socket, tickets API on a control socket.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--show-config", action="store_true",
                   help="print the effective configuration as TOML and exit")
    p.set_defaults(func=run)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE and --conf-dir DIR: the files ``config.load`` merges."""
    parser.add_argument("--config", metavar="FILE",
                        help="TOML configuration (default: embedded "
                             "defaults)")
    parser.add_argument("--conf-dir", metavar="DIR",
                        help="merge DIR/conf.d/*.toml in name order, after "
                             "--config")


def run(args: argparse.Namespace) -> int:
    # Imported here: the client commands need none of the daemon.
    from diskferry import logformat
    from diskferry.daemon import config as config_mod
    from diskferry.daemon.service import Daemon, notify_systemd
    from diskferry.errors import DiskferryError

    try:
        config = config_mod.load(args.config, args.conf_dir)
    except config_mod.ConfigError as e:
        print(f"diskferry: {e}", file=sys.stderr)
        return 2
    if args.show_config:
        sys.stdout.write(config_mod.dumps(config_mod.effective(config)))
        return 0
    logformat.configure(config.logging.level)
    daemon = Daemon(config)
    # Before start: a stop asked for as soon as the sockets exist counts.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: daemon.request_stop())
    try:
        daemon.start()
    except (OSError, DiskferryError) as e:
        print(f"diskferry: cannot start: {e}", file=sys.stderr)
        return 1
    for line in daemon.describe():
        logging.getLogger("diskferry").info("%s", line)
    notify_systemd("READY=1")
    daemon.wait()
    logging.getLogger("diskferry").info("stopping")
    notify_systemd("STOPPING=1")
    daemon.stop()
    logging.getLogger("diskferry").info("stopped")
    return 0
