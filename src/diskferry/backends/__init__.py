"""Storage backends: where the bytes of an image live.

A backend is opened per connection from a ticket's URL (``open_backend``)
and offers the small interface of ``base.Backend``. Nothing below here
knows HTTP.
"""
