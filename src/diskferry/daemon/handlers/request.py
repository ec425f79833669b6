"""What the handlers use of the HTTP core: a request and its connection.

Protocols, so that the handlers depend on the members they call, not on
the server's classes.
"""

from typing import Protocol

from diskferry.daemon.handlers.context import ConnectionContext
from diskferry.daemon.http.parse import RequestHead
from diskferry.daemon.http.request import AccessRecord
from diskferry.daemon.turns import Turn
from diskferry.pipe import Pipe


class Connection(Protocol):
    """A client connection: the body received, the answer sent."""

    #: CORS and other headers every answer of the request carries.
    extra_headers: dict[str, str]
    #: Close the connection once the answer is sent.
    close_after: bool

    @property
    def zero_copy(self) -> bool:
        """True on a plain socket, where the kernel may copy by itself."""

    def readinto(self, buf: memoryview) -> int: ...

    def readinto_full(self, view: memoryview,
                      turn: Turn | None = None) -> int: ...

    def splice_body(self, fd: int, offset: int, count: int, pipe: Pipe,
                    turn: Turn = ...) -> int: ...

    def splice_body_to_pipe(self, pipe: Pipe, count: int) -> int: ...

    def read_body(self, limit: int) -> bytes: ...

    def send_response(self, status: int, body: str | bytes = b"",
                      content_type: str = "text/plain",
                      headers: dict[str, str] | None = None) -> None: ...

    def start_response(self, status: int, content_length: int,
                       headers: dict[str, str] | None = None,
                       body: bytes = b"") -> None: ...

    def send_head(self, status: int, content_length: int,
                  headers: dict[str, str] | None = None) -> None: ...

    def write(self, data: memoryview) -> None: ...

    def sendfile(self, fd: int, offset: int, count: int) -> None: ...

    def send_pipe(self, pipe: Pipe, count: int) -> None: ...


class Request(Protocol):
    """One request, as a handler sees it."""

    @property
    def head(self) -> RequestHead: ...

    @property
    def method(self) -> str: ...

    @property
    def query(self) -> dict[str, str]: ...

    @property
    def headers(self) -> dict[str, str]: ...

    @property
    def conn(self) -> Connection: ...

    @property
    def log(self) -> AccessRecord:
        """Fields of the request's access log line."""

    @property
    def context(self) -> ConnectionContext:
        """The connection's state, which lends the request its buffer and
        pipes (``handlers.context``)."""
