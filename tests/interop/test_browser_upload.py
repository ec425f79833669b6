"""Interop: a web page of another origin uploads a disk with fetch().

What the oVirt administration portal does: JavaScript on a page served by
one origin PUTs an image to the daemon, another origin, in several
requests with ``Content-Range`` (each preflighted: CORS), flushes with
the last one (``?flush=y``; PATCH has no CORS in ovirt-imageio), and
reads a part back with a Range GET. A real headless Chromium runs the
page; a small HTTP server in the test serves it and takes the page's
report. The bytes on disk are then compared with what the page sent.
Run against ovirt-imageio 2.5.1 too, which proves the page itself.
"""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import threading
import urllib.parse

import pytest

from servers import make_sparse_file

MiB = 1 << 20
SIZE = 4 * MiB
#: The upload: 2.5 MiB and 3 bytes at OFFSET, in PIECES requests.
OFFSET = 4096
LENGTH = 5 * MiB // 2 + 3
PIECES = 5
#: Seconds the page has to report; it needs about one.
REPORT_TIMEOUT = 60

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>upload</title>
<script>
// The byte at position i of the upload; the test computes the same.
function pattern(start, length) {
  const data = new Uint8Array(length);
  for (let i = 0; i < length; i++) data[i] = ((start + i) * 31 + 7) % 251;
  return data;
}

async function report(result) {
  await fetch("/result", {method: "POST", body: JSON.stringify(result)});
}

async function upload() {
  const params = new URLSearchParams(location.search);
  const url = params.get("url");
  const offset = Number(params.get("offset"));
  const length = Number(params.get("length"));
  const pieces = Number(params.get("pieces"));
  const data = pattern(0, length);
  const step = Math.ceil(length / pieces);
  const statuses = [];
  for (let pos = 0; pos < length; pos += step) {
    const end = Math.min(pos + step, length);
    const last = end === length;
    const res = await fetch(url + (last ? "?flush=y" : "?flush=n"), {
      method: "PUT",
      headers: {
        "Content-Range": `bytes ${offset + pos}-${offset + end - 1}/*`,
        "Content-Type": "application/octet-stream",
      },
      body: data.subarray(pos, end),
    });
    statuses.push(res.status);
  }
  const first = offset + length - 1000;
  const res = await fetch(url, {
    headers: {"Range": `bytes=${first}-${offset + length - 1}`},
  });
  const back = new Uint8Array(await res.arrayBuffer());
  const expected = data.subarray(length - 1000);
  return {
    puts: statuses,
    get: res.status,
    readBack: back.length === expected.length &&
              back.every((b, i) => b === expected[i]),
  };
}

upload().then(report, (e) => report({error: String(e)}));
</script>
"""


def pattern(start: int, length: int) -> bytes:
    return bytes(((start + i) * 31 + 7) % 251 for i in range(length))


class PageServer:
    """Serves PAGE at / and takes the page's POST /result, on 127.0.0.1."""

    def __init__(self):
        self.result = None
        self.reported = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = PAGE.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                length = int(self.headers["Content-Length"])
                outer.result = json.loads(self.rfile.read(length))
                self.send_response(204)
                self.end_headers()
                outer.reported.set()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def chromium():
    path = shutil.which("chromium")
    if path is None:
        raise RuntimeError("chromium is not installed; run scripts/setup --test")
    return path


@pytest.mark.parametrize("kind", ["ovirt-imageio", "diskferry"])
def test_browser_upload_cross_origin(daemons, kind, tmp_path, make_ticket):
    server = daemons.get(kind)
    image = make_sparse_file(tmp_path / "image.raw", SIZE, {0: b"o" * SIZE})
    t = make_ticket(server, image, SIZE)
    with PageServer() as page:
        query = urllib.parse.urlencode({
            "url": server.image_url(t["uuid"]), "offset": OFFSET,
            "length": LENGTH, "pieces": PIECES,
        })
        browser = subprocess.Popen(
            [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
             "--ignore-certificate-errors", "--no-first-run",
             "--disable-extensions", "--disable-background-networking",
             f"--user-data-dir={tmp_path / 'profile'}",
             f"http://127.0.0.1:{page.port}/?{query}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "chromium.log", "wb"))
        try:
            reported = page.reported.wait(REPORT_TIMEOUT)
        finally:
            browser.terminate()
            try:
                browser.wait(10)
            except subprocess.TimeoutExpired:
                browser.kill()
                browser.wait()
    assert reported, (tmp_path / "chromium.log").read_text(errors="replace")[-3000:]
    assert page.result == {"puts": [200] * PIECES, "get": 206, "readBack": True}
    content = image.read_bytes()
    assert content[OFFSET:OFFSET + LENGTH] == pattern(0, LENGTH)
    assert content[:OFFSET] == b"o" * OFFSET
    assert content[OFFSET + LENGTH:] == b"o" * (SIZE - OFFSET - LENGTH)
