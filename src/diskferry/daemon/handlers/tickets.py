"""``/tickets/{id}``: the management plane's view of tickets.

``GET /tickets/`` (no id) lists every ticket, an extension: ovirt-imageio
answers it 400 and offers no listing, which leaves an operator no way to
see what a daemon serves.
"""

from diskferry.daemon.handlers.jsonbody import field, read_json, send_json
from diskferry.daemon.handlers.request import Request
from diskferry.daemon.tickets import MAX_TIMEOUT, TicketStore
from diskferry.errors import BadRequest


class TicketsHandler:

    def __init__(self, store: TicketStore) -> None:
        self.store = store

    def get(self, request: Request, ticket_id: str) -> None:
        if not ticket_id:
            send_json(request, [t.info() for t in self.store.tickets()])
            return
        send_json(request, self.store.get(ticket_id).info())

    def put(self, request: Request, ticket_id: str) -> None:
        if not ticket_id:
            raise BadRequest("Ticket id is required")
        self.store.add(read_json(request), ticket_id)
        request.conn.send_response(200)

    def patch(self, request: Request, ticket_id: str) -> None:
        if not ticket_id:
            raise BadRequest("Ticket id is required")
        msg = read_json(request)
        if not isinstance(msg, dict):
            raise BadRequest("Body must be a JSON object")
        timeout = field(msg, "timeout", int, required=True, minimum=0,
                        maximum=MAX_TIMEOUT)
        self.store.get(ticket_id).extend(timeout)
        request.conn.send_response(200)

    def delete(self, request: Request, ticket_id: str) -> None:
        if ticket_id:
            self.store.remove(ticket_id)
        else:
            self.store.clear()
        request.conn.send_response(204)
