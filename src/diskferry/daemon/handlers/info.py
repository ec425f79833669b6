"""``/info/``: the daemon's version."""

from diskferry import __version__
from diskferry.daemon.handlers.jsonbody import send_json


class InfoHandler:

    def get(self, request):
        send_json(request, {"version": __version__})
