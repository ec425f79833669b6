"""``/info/``: the daemon's version."""

from diskferry import __version__
from diskferry.daemon.handlers import cors
from diskferry.daemon.handlers.jsonbody import send_json
from diskferry.daemon.handlers.request import Request


class InfoHandler:
    """``cors``: on the images services, as ovirt-imageio; never on the
    control service."""

    def __init__(self, cors: bool = False) -> None:
        self.cors = cors

    def get(self, request: Request) -> None:
        if self.cors:
            cors.allow(request)
        send_json(request, {"version": __version__})
