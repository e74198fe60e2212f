"""The domain error tree. One place maps these to HTTP status codes and CLI exit
codes (``http_status`` / ``exit_code``); every message says what to do next."""

from __future__ import annotations

from typing import Any


class GtmError(Exception):
    """Root of every error a user or operator can cause."""

    http_status = 500
    exit_code = 1
    code = "internal_error"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class InvalidInput(GtmError):
    http_status = 422
    exit_code = 2
    code = "invalid_input"


class NotFound(GtmError):
    http_status = 404
    exit_code = 3
    code = "not_found"


class Conflict(GtmError):
    http_status = 409
    exit_code = 4
    code = "conflict"


class AdmissionRefused(Conflict):
    """The tenant does not fit; ``details`` carries every number that decided it."""

    code = "admission_refused"
    exit_code = 5


class Unauthorized(GtmError):
    http_status = 401
    exit_code = 6
    code = "unauthorized"


class RuntimeUnavailable(GtmError):
    """Docker (or another outside system) did not answer."""

    http_status = 503
    exit_code = 7
    code = "runtime_unavailable"


class GpuUnavailable(GtmError):
    """Start-up error in ``nvml`` mode: no driver, no device. Never a silent fallback."""

    http_status = 503
    exit_code = 8
    code = "gpu_unavailable"


class StateUnavailable(GtmError):
    """Start-up error: the state directory or database cannot be written. Nothing is started."""

    http_status = 503
    exit_code = 11
    code = "state_unavailable"


class EncryptionUnavailable(GtmError):
    """An encrypted volume cannot be made or opened: what the host lacks (the kernel, the
    manager's privileges, the key-encryption key), a wrong key, a full disk, a volume in use: the
    host's state conflicts with the request until an admin fixes it."""

    http_status = 409
    exit_code = 12
    code = "encryption_unavailable"


class EngineFailed(GtmError):
    """A command waited for an engine (``--wait``) and the engine failed; the reason is its own."""

    http_status = 502
    exit_code = 9
    code = "engine_failed"


class WaitTimedOut(GtmError):
    """A command waited (``--wait``, ``remove-tenant``) longer than its ``--timeout``."""

    http_status = 504
    exit_code = 10
    code = "wait_timed_out"


def exit_code_for(code: str) -> int:
    """The CLI exit code for an API error code (the API and the CLI share one table)."""
    stack: list[type[GtmError]] = [GtmError]
    while stack:
        cls = stack.pop()
        if cls.code == code:
            return cls.exit_code
        stack.extend(cls.__subclasses__())
    return 1
