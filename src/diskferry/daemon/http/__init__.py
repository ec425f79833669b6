"""A small HTTP/1.1 server core: listeners, connections, parsing, routing.

It knows nothing about images or tickets. The layers, bottom up:

    parse.py       pure functions: request head, ranges, query (no sockets)
    connection.py  one client connection: buffered head reading, body
                   streaming, responses, zero-copy hooks
    listener.py    listening sockets (TCP, TLS, UNIX path and abstract),
                   accept loop, one thread per connection
    router.py      maps (method, path) to a handler
"""
