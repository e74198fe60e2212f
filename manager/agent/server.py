"""The agent's HTTP server: ``GET /v1/node`` with the agent token answers the node's report, read
when asked (a report is as fresh as the request); ``GET /healthz`` answers that it serves (its
health check). Nothing else is served, and nothing is written."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from manager.node_report import HEALTH_PATH, REPORT_PATH, NodeReport

log = logging.getLogger(__name__)


def make_server(host: str, port: int, token: str, report: Callable[[], NodeReport]) -> ThreadingHTTPServer:
    """A server (not yet serving) that answers ``report()`` to requests bearing ``token``."""
    expected = f"Bearer {token}".encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "gtm-node-agent"

        def do_GET(self) -> None:
            if self.path == HEALTH_PATH:
                self._answer(HTTPStatus.OK, b'{"status": "ok"}')
                return
            if self.path != REPORT_PATH:
                self._answer(HTTPStatus.NOT_FOUND, b'{"error": "only GET /v1/node is served"}')
                return
            given = (self.headers.get("Authorization") or "").encode()
            if not token or not hmac.compare_digest(given, expected):
                self._answer(HTTPStatus.UNAUTHORIZED, b'{"error": "a valid agent token is required"}')
                return
            try:
                body = report().model_dump_json().encode()
            except Exception as exc:  # a report that cannot be read is said so, and the agent lives on
                log.exception("reading the node's report failed")
                self._answer(HTTPStatus.SERVICE_UNAVAILABLE, f'{{"error": "{type(exc).__name__}"}}'.encode())
                return
            self._answer(HTTPStatus.OK, body)

        def _answer(self, status: HTTPStatus, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug(format, *args)

    return ThreadingHTTPServer((host, port), Handler)
