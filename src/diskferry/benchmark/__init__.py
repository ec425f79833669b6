"""``diskferry bench``: this machine's transfer speed, measured.

- ``localdaemon``: a diskferry daemon of the benchmark's own, on free
  addresses and a scratch state folder, with its CPU time readable;
- ``limits``: what the machine allows, measured the same run: a page
  cache read, ``sendfile`` into a UNIX socket, Python's TLS in memory, a
  local ``qemu-img convert``;
- ``runner``: images, transfers with the diskferry command (timed as
  whole processes, like a user's), and the report.
"""
