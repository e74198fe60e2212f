"""Raw HTTP/1.1 over a socket, for tests of what a client library would never send
(half-sent headers, dot segments, header floods)."""

from __future__ import annotations

import socket
import time


def exchange(port: int, data: bytes, timeout: float = 30.0) -> tuple[bytes, float]:
    """Sends ``data`` to 127.0.0.1:``port``, reads until the server closes; returns what came back
    and after how many seconds."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        out = b""
        while chunk := conn.recv(65536):
            out += chunk
    return out, time.monotonic() - started
