"""The agent's HTTP server: ``GET /v1/node`` with the agent token answers the node's report, read
when asked (a report is as fresh as the request); ``DELETE /v1/volumes/<name>`` with the token
removes one of its instance's volumes on the node (``agent.volumes``); ``GET /healthz`` answers
that it serves (its health check). Nothing else is served."""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from manager.node_report import HEALTH_PATH, REPORT_PATH, VOLUMES_PATH, NodeReport

log = logging.getLogger(__name__)


VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")


def make_server(
    host: str,
    port: int,
    token: str,
    report: Callable[[], NodeReport],
    remove_volume: Callable[[str], str | None] | None = None,
) -> ThreadingHTTPServer:
    """A server (not yet serving) that answers ``report()`` to requests bearing ``token``, and
    ``remove_volume(name)`` (None: gone; else why it stays) to their deletes."""
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
            if not self._authorized():
                return
            try:
                body = report().model_dump_json().encode()
            except Exception as exc:  # a report that cannot be read is said so, and the agent lives on
                log.exception("reading the node's report failed")
                self._answer(HTTPStatus.SERVICE_UNAVAILABLE, f'{{"error": "{type(exc).__name__}"}}'.encode())
                return
            self._answer(HTTPStatus.OK, body)

        def do_DELETE(self) -> None:
            name = self.path[len(VOLUMES_PATH) :] if self.path.startswith(VOLUMES_PATH) else ""
            if remove_volume is None or not VOLUME_NAME.fullmatch(name):
                self._answer(HTTPStatus.NOT_FOUND, b'{"error": "only DELETE /v1/volumes/<name> is served"}')
                return
            if not self._authorized():
                return
            try:
                kept = remove_volume(name)
            except Exception as exc:
                log.exception("removing volume %s failed", name)
                self._answer(HTTPStatus.SERVICE_UNAVAILABLE, json.dumps({"error": type(exc).__name__}).encode())
                return
            if kept is None:
                log.info("volume %s removed (or was not here)", name)
                self._answer(HTTPStatus.OK, json.dumps({"removed": name}).encode())
            else:
                self._answer(HTTPStatus.CONFLICT, json.dumps({"error": kept}).encode())

        def _authorized(self) -> bool:
            given = (self.headers.get("Authorization") or "").encode()
            if token and hmac.compare_digest(given, expected):
                return True
            self._answer(HTTPStatus.UNAUTHORIZED, b'{"error": "a valid agent token is required"}')
            return False

        def _answer(self, status: HTTPStatus, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug(format, *args)

    return ThreadingHTTPServer((host, port), Handler)
