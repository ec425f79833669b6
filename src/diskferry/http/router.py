"""Routing of requests to handler methods by path pattern and method."""

import re

from diskferry.errors import MethodNotAllowed, NotFound


class Router:
    """Maps a path regex to a handler object whose methods are HTTP verbs.

    A handler answers ``GET`` with its ``get(request, *groups)`` method,
    and so on; a verb it lacks is a 405.
    """

    def __init__(self, routes):
        self._routes = [(re.compile(pattern + r"\Z"), handler)
                        for pattern, handler in routes]

    def dispatch(self, request):
        for pattern, handler in self._routes:
            match = pattern.match(request.path)
            if match:
                method = getattr(handler, request.method.lower(), None)
                if method is None:
                    raise MethodNotAllowed(
                        f"Method {request.method} not allowed on "
                        f"{request.path}")
                return method(request, *match.groups())
        raise NotFound(f"No resource {request.path}")
