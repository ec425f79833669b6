"""diskferry: move virtual disk images in and out of a host over HTTP.

The daemon (``diskferry serve``) speaks the images and tickets API of
oVirt's image I/O daemon; the client (``diskferry.client``) moves whole
images through any server speaking it, over a UNIX socket when local.
"""

__version__ = "0.1.0"
