"""A small HTTP/1.1 server core: listeners, connections, parsing, routing.

It knows nothing about images or tickets. The layers, bottom up:

    parse.py       pure functions: request head, ranges, query (no sockets)
    connection.py  one client connection: head reading and parsing,
                   body framing, responses, zero-copy hooks
    request.py     what a handler gets: Request, AccessRecord, and the
                   ConnectionState the server reads
    exchange.py    one request and its answer; errors become statuses
    accesslog.py   the access line, secrets the application names
                   shortened
    router.py      maps (method, path) to a handler
    server.py      accept loop, one thread per connection, stopping
    listener.py    listening sockets (TCP, TLS, UNIX path and abstract)
"""
