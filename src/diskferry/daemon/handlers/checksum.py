"""``/images/{ticket}/checksum``: a block hash of the image's content."""

from diskferry import checksum
from diskferry.daemon.backends.base import ForwardsChecksum
from diskferry.daemon.config import Config
from diskferry.daemon.handlers.context import open_image
from diskferry.daemon.handlers.jsonbody import send_json
from diskferry.daemon.handlers.request import Request
from diskferry.daemon.tickets import TicketStore


class ChecksumHandler:

    def __init__(self, store: TicketStore, config: Config) -> None:
        self.store = store
        self.config = config

    def get(self, request: Request, ticket_id: str) -> None:
        algorithm, block_size = checksum.validate(
            request.query.get("algorithm"), request.query.get("block_size"))
        image = open_image(request, self.store, self.config, ticket_id, "read")
        backend = image.backend
        with image.ticket.operation() as op:
            if isinstance(backend, ForwardsChecksum):
                # A proxied image: hashed where it is stored, not read here.
                result = backend.checksum(algorithm, block_size)
            else:
                result = checksum.compute(backend, algorithm=algorithm,
                                          block_size=block_size,
                                          progress=lambda _: op.check())
        send_json(request, result)


class AlgorithmsHandler:

    def get(self, request: Request, ticket_id: str) -> None:
        send_json(request, checksum.algorithms())
