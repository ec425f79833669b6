"""``/images/{ticket}/checksum``: a block hash of the image's content."""

from diskferry import checksum
from diskferry.handlers.context import open_image
from diskferry.handlers.jsonbody import send_json
from diskferry.http import parse


class ChecksumHandler:

    def __init__(self, store, config):
        self.store = store
        self.config = config

    def get(self, request, ticket_id):
        algorithm = request.query.get("algorithm", checksum.DEFAULT_ALGORITHM)
        block_size = parse.query_int(request.query, "block_size",
                                     checksum.DEFAULT_BLOCK_SIZE, minimum=1)
        checksum.validate(algorithm, block_size)
        image = open_image(request, self.store, self.config, ticket_id, "read")
        with image.ticket.operation():
            result = checksum.compute(image.backend, algorithm=algorithm,
                                      block_size=block_size)
        send_json(request, result)


class AlgorithmsHandler:

    def get(self, request, ticket_id):
        send_json(request, {"algorithms": list(checksum.ALGORITHMS)})
