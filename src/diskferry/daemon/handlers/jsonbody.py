"""Small JSON request bodies and JSON responses."""

import json
from collections.abc import Iterable
from typing import Any, Protocol

from diskferry.daemon.http.parse import RequestHead

# Request bodies' fields are checked as tickets' are, by one function.
from diskferry.daemon.jsonfield import field as field
from diskferry.errors import BadRequest, PayloadTooLarge

#: Largest JSON body accepted (tickets, PATCH). A ticket is a few hundred
#: bytes; 64 KiB leaves room for long URLs and file names.
MAX_JSON_BODY = 64 * 1024

#: Deepest nesting of arrays and objects accepted. A ticket is two levels
#: deep (an object holding the ``ops`` list). The parser itself gives up
#: with RecursionError near Python's recursion limit (~1000), and a value
#: nested a few hundred deep can still exhaust the stack later (``repr``
#: in an error message), so depth is bounded well below both.
MAX_JSON_DEPTH = 32


def json_depth(obj: object) -> int:
    """How deeply arrays and objects nest in ``obj``; without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Iterable[object] = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(data: bytes) -> Any:
    """Bytes of a JSON body to a value; 400 for anything else."""
    try:
        obj = json.loads(data)
    except RecursionError:
        obj = None
        depth_exceeded = True
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"Invalid JSON body: {e}") from None
    else:
        depth_exceeded = json_depth(obj) > MAX_JSON_DEPTH
    if depth_exceeded:
        raise BadRequest(f"Invalid JSON body: nested deeper than "
                         f"{MAX_JSON_DEPTH} levels")
    return obj


class JsonConnection(Protocol):
    """What of a connection a JSON body and answer need."""

    def read_body(self, limit: int) -> bytes: ...

    def send_response(self, status: int, body: bytes = b"",
                      content_type: str = "text/plain",
                      headers: dict[str, str] | None = None) -> None: ...


class JsonRequest(Protocol):
    """What of a request a JSON body and answer need."""

    @property
    def head(self) -> RequestHead: ...

    @property
    def conn(self) -> JsonConnection: ...


def read_json(request: JsonRequest) -> Any:
    length = request.head.content_length
    if length is None:
        raise BadRequest("Content-Length header is required")
    if length > MAX_JSON_BODY:
        raise PayloadTooLarge(
            f"JSON body of {length} bytes is larger than {MAX_JSON_BODY}")
    return parse_json(request.conn.read_body(MAX_JSON_BODY))


def send_json(request: JsonRequest, obj: object, status: int = 200,
              headers: dict[str, str] | None = None) -> None:
    body = json.dumps(obj).encode("utf-8")
    request.conn.send_response(status, body, content_type="application/json",
                               headers=headers)
