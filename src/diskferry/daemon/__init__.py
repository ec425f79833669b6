"""The daemon: HTTP server, tickets, handlers and storage backends.

Everything under this package serves the images API and the control
service. It may use what the package root shares with the client
(``errors``, ``extent``, ``pipe``, ``hostid``, ``checksum``, ``nbd``) and
the client itself, never the reverse.
"""
