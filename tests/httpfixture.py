"""A threaded HTTP server on 127.0.0.1 (a random free port) serving in-memory files, with faults on demand.

    with FixtureServer() as srv:
        route = srv.add("/a.bin", data, fail_first=2, truncate_first=1)
        fetch_url(srv.url("/a.bin"), dest)
        route.requests      # the headers of every request for /a.bin, in order

Faults, per route (counted per route, so several routes can misbehave independently):
- fail_first=N       answer HTTP 500 to the first N requests
- truncate_first=N   on the first N bodies served, announce the full Content-Length but hang up
                     after `truncate_at` (a fraction of the body) bytes
- bad_body, bad_first=N   serve `bad_body` instead of `body` for the first N bodies (-1: always)
- ignore_range=True  answer every request with 200 and the whole body, whatever Range says
- status=CODE        always answer with this HTTP status (e.g. 404)
Unknown paths get 404.
"""
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["Route", "FixtureServer"]


@dataclass
class Route:
    body: bytes
    fail_first: int = 0
    truncate_first: int = 0
    truncate_at: float = 0.5
    bad_body: bytes = None
    bad_first: int = 0
    ignore_range: bool = False
    status: int = None
    requests: list = field(default_factory=list)  # one dict of request headers per request
    served: int = 0                               # bodies sent so far (whole or cut)

    @property
    def ranges(self) -> list:
        "The Range header of each request (None where there was none)."
        return [h.get("Range") for h in self.requests]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: a hang-up ends exactly one response

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        fx = self.server.fixture
        with fx.lock:
            route = fx.routes.get(self.path)
            fx.log.append((self.path, dict(self.headers)))
            if route is None:
                return self.send_error(404)
            route.requests.append(dict(self.headers))
            nreq = len(route.requests)
            if route.status:
                return self.send_error(route.status)
            if nreq <= route.fail_first:
                return self.send_error(500, "fixture: failing on purpose")
            k = route.served
            route.served += 1
        bad = route.bad_body is not None and (route.bad_first < 0 or k < route.bad_first)
        body = route.bad_body if bad else route.body
        start, rng = 0, self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not route.ignore_range:
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if k < route.truncate_first:
            cut = min(int(len(payload) * route.truncate_at), max(len(payload) - 1, 0))
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


class FixtureServer:
    "A loopback HTTP server for download tests; use as a context manager."

    def __init__(self):
        self.routes, self.log, self.lock = {}, [], threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.fixture = self
        self.thread = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def add(self, path: str, body: bytes, **faults) -> Route:
        "Serve `body` at `path` with the given faults; returns the route (it records the requests)."
        if not path.startswith("/"):
            raise ValueError(f"paths start with '/', got {path!r}")
        route = Route(body=body, **faults)
        with self.lock:
            self.routes[path] = route
        return route

    def start(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.02), daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
