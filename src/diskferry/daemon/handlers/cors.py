"""CORS on the images API, as ovirt-imageio 2.5.1 answers it.

The oVirt administration portal uploads disks from a web page served by
another origin, straight to the daemon: the browser needs these headers
on the preflight (``OPTIONS``) and on each ``GET`` and ``PUT`` answer, or
it refuses to hand the answer to the page. Observed in ovirt-imageio
2.5.1 and copied header by header (docs/protocol.md, CORS):

    request header                    answer header
    Origin (not empty)                Access-Control-Allow-Origin: *
    Access-Control-Request-Headers    Access-Control-Allow-Headers: *
    Access-Control-Request-Method     Access-Control-Allow-Methods:
                                        OPTIONS,GET,PUT on OPTIONS, else *
    any of the three                  Access-Control-Max-Age: 86400

Each handler that has CORS calls ``allow`` first, before authorizing the
ticket, so its errors (403, 400, 416) carry the headers too. Which
resources have it follows ovirt-imageio: ``/images/{id}`` OPTIONS, GET,
HEAD and PUT, ``/images/`` and ``/info/`` of the images services; not
PATCH, extents or checksum, and never the control service. ``*`` with no
credentials is safe here: the ticket id in the URL is the authorization,
no cookie or header the browser would add.
"""

from typing import Protocol

#: What a preflight is told it may send: ovirt-imageio's list.
PREFLIGHT_METHODS = "OPTIONS,GET,PUT"

#: Seconds a browser may cache a preflight answer.
MAX_AGE = "86400"


class Connection(Protocol):
    extra_headers: dict[str, str]


class Request(Protocol):
    @property
    def headers(self) -> dict[str, str]: ...

    @property
    def conn(self) -> Connection: ...


def headers_for(request_headers: dict[str, str],
                preflight: bool = False) -> dict[str, str]:
    """The CORS answer headers for a request's headers (lower-case keys)."""
    answer = {}
    if request_headers.get("origin"):
        answer["Access-Control-Allow-Origin"] = "*"
    if request_headers.get("access-control-request-headers"):
        answer["Access-Control-Allow-Headers"] = "*"
    if request_headers.get("access-control-request-method"):
        answer["Access-Control-Allow-Methods"] = (
            PREFLIGHT_METHODS if preflight else "*")
    if answer:
        answer["Access-Control-Max-Age"] = MAX_AGE
    return answer


def allow(request: Request, preflight: bool = False) -> None:
    """Put the CORS headers on whatever answer ``request`` gets."""
    request.conn.extra_headers.update(
        headers_for(request.headers, preflight))
