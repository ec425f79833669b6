"""Thin glue from HTTP requests to tickets and backends.

``images_app`` serves the images API (remote and local services),
``control_app`` the tickets API (control service).
"""

from diskferry.daemon.handlers.app import control_app, images_app

__all__ = ["control_app", "images_app"]
