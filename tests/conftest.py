"""Shared fixtures."""

import http.server
import threading

import pytest


@pytest.fixture()
def serve():
    """``serve(payload)``: an HTTP server on 127.0.0.1 that answers every GET with ``payload``,
    honouring ``Range: bytes=N-``; returns its base URL and the list of Range headers it saw."""
    servers = []

    def start(payload: bytes) -> tuple[str, list[str | None]]:
        ranges: list[str | None] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                ranges.append(rng)
                body, status = payload, 200
                if rng:
                    body, status = payload[int(rng.removeprefix("bytes=").split("-")[0]) :], 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/", ranges

    yield start
    for httpd in servers:
        httpd.shutdown()
