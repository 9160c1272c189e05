"""Fake HTTP servers of the tests: a threaded server on 127.0.0.1, and replies (JSON or bytes) with a length.

A fake keeps its routing and what it records; `http_server` runs it, `reply` answers::

    with http_server(lambda h: reply(h, 200, {"ok": True})) as base:  # base: http://127.0.0.1:PORT
        ...
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

Handle = Callable[[BaseHTTPRequestHandler], None]


@contextlib.contextmanager
def http_server(handle: Handle) -> Iterator[str]:
    """Serve `handle(request)` for every method on 127.0.0.1 (a free port) in daemon threads; yields the base URL.

    On exit the server is shut down, its socket closed and its thread joined.
    """

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _handle(self) -> None:
            handle(self)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def reply(
    h: BaseHTTPRequestHandler, status: int, body: dict | list | bytes = b"", headers: Iterable[tuple[str, str]] = ()
) -> None:
    """Answer with `status`, `headers` and `body` (a dict or list as JSON, bytes as they are), with Content-Length."""
    headers = list(headers)
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.insert(0, ("Content-Type", "application/json"))
    h.send_response(status)
    for name, value in headers:
        h.send_header(name, value)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


class FakeServer:
    """Base of a fake: `with Fake(...) as fake:` serves `fake.handle` at `fake.base` (http://127.0.0.1:PORT)."""

    base = ""

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._running = http_server(self.handle)
        self.base = self._running.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._running.__exit__(*exc)
