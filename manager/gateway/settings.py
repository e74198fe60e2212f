"""Settings of a gateway process (``GTM_GATEWAY_*``), set by the manager on the container."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from manager.domain import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGES


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GTM_GATEWAY_", extra="ignore")

    tenant: str = "tenant"
    upstream: str = "http://engine:8000"
    host: str = "0.0.0.0"
    public_port: int = 8000
    admin_port: int = 8001
    admin_token: SecretStr = SecretStr("")
    data_dir: Path = Path("/data")
    max_body_bytes: int = 32 * 1024 * 1024
    """Request body limit until the manager pushes the tenant's own (``--max-body``)."""
    max_images: int = DEFAULT_MAX_IMAGES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Image limits until the manager pushes the tenant's own (``--max-images``, ``--max-image-pixels``)."""
    image_requests: int = 0
    """Requests carrying images served at once (0: no limit); more wait for a slot, and get 503 after
    ``body_idle_timeout_s``. The manager sets 1 in cpu mode: a CPU engine's reservation holds the
    decode of one request's images (manager.control.modelfit.image_decode_bytes)."""
    large_bodies: int = 4
    """Requests with a body over 1 MiB (images) in flight at once; more wait for a slot, and get 503
    after ``body_idle_timeout_s``. With bodies of at most 64 MiB this bounds the gateway's memory."""
    default_max_tokens: int = 512
    upstream_timeout_s: float = 600.0
    header_timeout_s: float = 10.0
    """A client must send a request's whole header within this time (408 and closed otherwise)."""
    body_idle_timeout_s: float = 30.0
    """A body that stops arriving for this long is answered 408 (a short Content-Length)."""
    max_headers: int = 100
    max_header_bytes: int = 32 * 1024
    """Request line plus headers; more is answered 431."""
    send_buffer_bytes: int = 256 * 1024
    """What one connection buffers on its way out, in the kernel and in the gateway each: a stream
    goes no faster than its client reads."""
    stall_timeout_s: float = 60.0
    """A streamed answer whose client reads nothing for this long is ended: the engine aborts the
    request, and it is metered for what was generated."""
    max_connections: int = 2048
    """Open connections and requests at once on the public port; more are answered 503."""
