"""``diskferry serve``: run the daemon in the foreground."""

import argparse
import logging
import signal
import sys

EPILOG = """\
examples:
  diskferry serve                       embedded defaults, state in ./.diskferry
  diskferry serve --config /etc/diskferry/daemon.toml

With no configuration the daemon listens on https://127.0.0.1:54322,
generates a CA and server certificate under the state folder
($DISKFERRY_STATE_DIR, else ./.diskferry) and prints where everything
is. Stop it with Ctrl-C or SIGTERM: running requests get time to finish.
"""


def register(subparsers):
    p = subparsers.add_parser(
        "serve", help="run the daemon in the foreground",
        description="Run the diskferry daemon: images API over TLS and a "
                    "local UNIX socket, tickets API on a control socket.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="TOML configuration (default: embedded defaults)")
    p.set_defaults(func=run)


def run(args):
    # Imported here: the client commands need none of the daemon.
    from diskferry import logformat
    from diskferry.daemon import config as config_mod
    from diskferry.daemon.service import Daemon, notify_systemd
    from diskferry.errors import DiskferryError

    try:
        config = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        print(f"diskferry: {e}", file=sys.stderr)
        return 2
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
