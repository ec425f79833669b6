"""Thin glue from HTTP requests to tickets and backends.

``images_app`` serves the images API (remote and local services),
``control_app`` the tickets API (control service), ``metrics_app`` the
metrics on a port of their own.
"""

from diskferry.daemon.handlers.app import control_app, images_app, metrics_app

__all__ = ["control_app", "images_app", "metrics_app"]
