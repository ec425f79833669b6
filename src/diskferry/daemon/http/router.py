"""Routing of requests to handler methods by path pattern and method.

A handler answers ``GET`` with its ``get(request, *groups)`` method, and
so on. Only the methods of ``HTTP_METHODS`` are ever looked up, once, when
the router is built: a request method is a key into that table and never
names an attribute, so ``STORE`` cannot reach a handler's ``store``.

    method not in HTTP_METHODS         501, whatever the path
    path matches no route              404
    handler lacks the method           405, ``Allow`` lists those it has
"""

import re
from collections.abc import Callable, Iterable
from typing import Protocol

from diskferry.errors import MethodNotAllowed, MethodNotImplemented, NotFound

#: The methods of RFC 9110 and PATCH (RFC 5789). Another method gets 501
#: (RFC 9110 15.6.2: a method the server does not recognize); one of these
#: that a resource does not support gets 405.
HTTP_METHODS = ("OPTIONS", "GET", "HEAD", "PUT", "PATCH", "POST", "DELETE",
                "CONNECT", "TRACE")

Handler = Callable[..., object]


class RoutedRequest(Protocol):
    """What routing needs of a request."""

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str: ...


def handler_methods(handler: object) -> dict[str, Handler]:
    """The HTTP methods ``handler`` declares, by method name."""
    methods = {}
    for name in HTTP_METHODS:
        method = getattr(handler, name.lower(), None)
        if callable(method):
            methods[name] = method
    return methods


class Router:
    """Maps a path regex to a handler object whose methods are HTTP verbs."""

    def __init__(self, routes: Iterable[tuple[str, object]]) -> None:
        self._routes = [(re.compile(pattern + r"\Z"), handler_methods(handler))
                        for pattern, handler in routes]

    def dispatch(self, request: RoutedRequest) -> object:
        if request.method not in HTTP_METHODS:
            raise MethodNotImplemented(
                f"Method {request.method[:20]!r} is not implemented")
        for pattern, methods in self._routes:
            match = pattern.match(request.path)
            if match:
                method = methods.get(request.method)
                if method is None:
                    raise MethodNotAllowed(
                        f"Method {request.method} not allowed on "
                        f"{request.path[:200]!r}", allow=tuple(methods))
                return method(request, *match.groups())
        raise NotFound(f"No resource {request.path[:200]!r}")
