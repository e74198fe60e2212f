"""Images checked at the door: what an engine would decode is read from its header alone.

A chat request carries images as OpenAI ``image_url`` parts. Before the engine sees one, the
gateway reads its width and height from the first bytes of the file (PNG, JPEG, WebP, GIF),
never decoding the pixels, and refuses:

- an image over the tenant's pixel limit (decoding a 9000 x 9000 PNG took a CPU engine's API
  server from 572 MiB to 2.3 GiB: an engine sized for its model would be OOM-killed, taking every
  member's requests with it);
- more images in one request than the tenant allows;
- a remote URL (``http(s)://``, ``file://``...): engines have no internet access by design; a
  fetch would hang, then fail with a 500;
- a ``data:`` URL whose bytes do not start like an image of a known format.

The readers are pure functions over bytes; ``tests/unit/test_images.py`` runs them on real files
of each format, including truncated and lying headers.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

HEADER_B64 = 4096
"""Base64 characters decoded first (3 KiB): PNG, GIF and WebP sizes are in the first 30 bytes; a
JPEG's frame header may follow metadata segments, so more is decoded (in growing steps) until it
is found."""


class Truncated(ValueError):
    """The bytes end before the header does."""


@dataclass(frozen=True)
class ImageSize:
    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class ImageProblem:
    """Why a request's images are refused, in the words the client sees (a 400)."""

    message: str
    code: str
    param: str | None = None


def _need(data: bytes, end: int) -> None:
    if len(data) < end:
        raise Truncated(f"the image ends after {len(data)} bytes, inside its header")


def _png(data: bytes) -> ImageSize:
    _need(data, 24)
    length, kind = struct.unpack(">I4s", data[8:16])
    if kind != b"IHDR" or length != 13:
        raise ValueError("a PNG must start with its IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    return ImageSize("png", width, height)


def _gif(data: bytes) -> ImageSize:
    """The logical screen, or the first frame where it reaches beyond it (decoders grow the
    canvas to fit the frame)."""
    _need(data, 13)
    width, height, flags = struct.unpack("<HHB", data[6:11])
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while True:
        _need(data, pos + 1)
        block = data[pos]
        if block == 0x2C:  # image descriptor: left, top, width, height
            _need(data, pos + 9)
            left, top, w, h = struct.unpack("<HHHH", data[pos + 1 : pos + 9])
            return ImageSize("gif", max(width, left + w), max(height, top + h))
        if block != 0x21:  # an extension is the only other block before the first frame
            raise ValueError("a GIF's first frame is missing")
        pos += 2
        while True:  # the extension's sub-blocks, up to the empty one
            _need(data, pos + 1)
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break


def _webp(data: bytes) -> ImageSize:
    _need(data, 30)
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: the canvas, 24-bit little-endian, minus one
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
    elif chunk == b"VP8 ":  # lossy: a key frame's start code, then 14-bit sizes
        if data[23:26] != b"\x9d\x01\x2a":
            raise ValueError("a lossy WebP must start with a key frame")
        width, height = (v & 0x3FFF for v in struct.unpack("<HH", data[26:30]))
    elif chunk == b"VP8L":  # lossless: a signature byte, then 14-bit sizes minus one
        if data[20] != 0x2F:
            raise ValueError("a lossless WebP must start with its signature")
        bits = int.from_bytes(data[21:25], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    else:
        raise ValueError(f"unknown WebP chunk {chunk!r}")
    return ImageSize("webp", width, height)


JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
"""Start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8 and CC are tables."""


def _jpeg(data: bytes) -> ImageSize:
    pos = 2
    while True:
        _need(data, pos + 4)
        if data[pos] != 0xFF:
            raise ValueError("a JPEG segment must start with 0xFF")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            raise ValueError("a JPEG's frame header is missing (its image data starts first)")
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2:
            raise ValueError("a JPEG segment is shorter than its own length field")
        if marker in JPEG_FRAMES:
            _need(data, pos + 9)
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return ImageSize("jpeg", width, height)
        pos += 2 + length


def image_size(data: bytes) -> ImageSize:
    """Width and height from the header of a PNG, JPEG, WebP or GIF. ValueError (Truncated when
    the bytes end too soon) for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        size = _png(data)
    elif data.startswith(b"\xff\xd8"):
        size = _jpeg(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        size = _webp(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        size = _gif(data)
    elif len(data) < 12:
        raise Truncated("too few bytes to tell the image's format")
    else:
        raise ValueError("not a PNG, JPEG, WebP or GIF image")
    if size.width == 0 or size.height == 0:
        raise ValueError(f"the header says {size.width} x {size.height} pixels")
    return size


def data_url_size(url: str) -> ImageSize:
    """The size of a base64 ``data:`` URL's image, decoding only as much as its header needs."""
    head, sep, encoded = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise ValueError("a data: URL must be base64 (data:image/png;base64,...)")
    step = HEADER_B64
    while True:
        part = encoded[:step]
        try:
            data = base64.b64decode(part[: len(part) - len(part) % 4], validate=True)
        except binascii.Error:
            raise ValueError("its data is not valid base64") from None
        try:
            return image_size(data)
        except Truncated:
            if step >= len(encoded):
                raise
            step *= 8


def _parts(payload: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict):
                    yield f"messages[{i}].content[{j}]", part


def _url_of(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("url"), str):
        return str(value["url"])
    return None


def count_images(payload: dict[str, Any]) -> int:
    """The ``image_url`` parts of a chat request."""
    return sum(1 for _, part in _parts(payload) if "image_url" in part)


UNSERVED_PARTS = ("video_url", "audio_url", "input_audio", "video", "audio")
"""Content parts of the modalities no engine is started for: each engine's
``--limit-mm-per-prompt`` allows video and audio 0 (``plan.modality_limits``)."""


def check_images(payload: dict[str, Any], max_images: int, max_pixels: int) -> ImageProblem | None:
    """The first reason to refuse a chat request's images, or None when the engine may see them.
    A video or audio part is refused (no engine takes them); every URL-bearing part is looked at
    (an engine would fetch it); images are counted and measured."""
    images = 0
    for where, part in _parts(payload):
        kind = part.get("type")
        unserved = kind if kind in UNSERVED_PARTS else next((f for f in UNSERVED_PARTS if f in part), None)
        if unserved is not None:
            return ImageProblem(
                f"{where} is a {unserved} part: this API takes text and images only (its model engine is "
                "started without video or audio). Send text and images.",
                "modality_not_supported",
                where,
            )
        for field, value in part.items():
            if not field.endswith("_url"):
                continue
            param = f"{where}.{field}"
            url = _url_of(value)
            if url is None:
                return ImageProblem(f"{param} must be an object with a 'url'.", "invalid_image_url", param)
            if url[:5].lower() != "data:":
                scheme = url.split(":", 1)[0][:16] if ":" in url else "a relative"
                return ImageProblem(
                    f"{param}: {scheme} URLs are not fetched: the model engine has no internet access. Send the "
                    "file inline as a base64 data: URL (data:image/png;base64,...).",
                    "image_url_not_supported",
                    param,
                )
            if field != "image_url":
                continue
            images += 1
            if max_images == 0:
                return ImageProblem(
                    "This API takes no images: its model reads text only (or its administrator set "
                    "--max-images 0). Send text, or ask your administrator for a vision model.",
                    "images_not_supported",
                    param,
                )
            if images > max_images:
                return ImageProblem(
                    f"This request has more than {max_images} images; this API takes at most {max_images} a "
                    "request. Send fewer images, or ask your administrator to raise it (update-tenant --max-images).",
                    "too_many_images",
                    param,
                )
            try:
                size = data_url_size(url)
            except ValueError as exc:
                return ImageProblem(
                    f"{param} is not a readable image ({exc}). Send a PNG, JPEG, WebP or GIF as "
                    "data:image/<format>;base64,<data>.",
                    "invalid_image",
                    param,
                )
            if size.pixels > max_pixels:
                return ImageProblem(
                    f"{param} is {size.width} x {size.height} pixels ({size.pixels / 1e6:.1f} megapixels), over "
                    f"this API's limit of {max_pixels / 1e6:.1f} megapixels an image. Resize it (the model sees "
                    "it smaller anyway), or ask your administrator to raise it (update-tenant --max-image-pixels).",
                    "image_too_large",
                    param,
                )
    return None
