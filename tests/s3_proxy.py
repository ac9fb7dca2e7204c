"""A loopback HTTP proxy in front of the moto S3 server: counts S3 requests by kind (LIST, GET, HEAD, PUT, POST,
DELETE) and answers chosen ones `503 SlowDown` as a throttled S3 does, without forwarding them.

Used by the throttling tests and by `benchmarks/stores.py` (request counts per 10,000 rows)."""

from __future__ import annotations

import http.client
import re
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message><RequestId>proxy</RequestId></Error>")
# Hop-by-hop headers are the proxy's own; the body is re-sent whole with its length.
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te", "upgrade"}


def kind(method: str, target: str) -> str:
    """The S3 request kind of `method target` (path-style): LIST for a bucket's listings, else the method."""
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    bucket_only = parts.path.strip("/").count("/") == 0
    if method == "GET" and (bucket_only or "uploads" in query or "list-type" in query):
        return "LIST"
    return method


class SlowDownProxy:
    """`endpoint` forwards to `upstream`; `throttle(kind, key)` says which requests get a 503 instead.

    `counts` holds the requests that reached S3 by kind, `throttled` those answered 503 by kind, and
    `puts[key]` the PUTs of each object key that S3 answered 200."""

    def __init__(self, upstream: str, throttle: Callable[[str, str], bool] = lambda kind, key: False) -> None:
        self.upstream = urlsplit(upstream)
        self.throttle = throttle
        self.counts: Counter = Counter()
        self.throttled: Counter = Counter()
        self.puts: Counter = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.throttled.clear()
            self.puts.clear()

    def __enter__(self) -> "SlowDownProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # one line per request would drown a test's output
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                what = kind(self.command, self.path)
                key = re.sub(r"^/[^/]+/?", "", urlsplit(self.path).path)
                if proxy.throttle(what, key):
                    with proxy._lock:
                        proxy.throttled[what] += 1
                    self._answer(503, [("Content-Type", "application/xml")], SLOW_DOWN)
                    return
                with proxy._lock:
                    proxy.counts[what] += 1
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP and k.lower() != "expect"}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    if what == "PUT" and response.status == 200 and "partNumber" not in self.path:
                        with proxy._lock:
                            proxy.puts[key] += 1
                    # A HEAD's length is the object's, its body empty.
                    length = response.getheader("Content-Length", "0") if self.command == "HEAD" else None
                    self._answer(response.status, [(k, v) for k, v in response.getheaders()
                                                   if k.lower() not in _HOP], data, length)
                finally:
                    upstream.close()

            def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes,
                        length: str | None = None) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", length if length is not None else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        return Handler
