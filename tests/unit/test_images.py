"""The gateway's image door: header readers on real files of each format (written by Pillow),
truncated and lying headers, and the request-level checks."""

from __future__ import annotations

import base64
import io
import struct

import pytest
from PIL import Image

from manager.gateway.images import Truncated, check_images, data_url_size, image_size


def encoded(width: int, height: int, fmt: str, **save: object) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, fmt, **save)
    return out.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def chat(*urls: str, text: str = "What is in this image?") -> dict[str, object]:
    parts: list[dict[str, object]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"model": "m", "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]}


@pytest.mark.parametrize(
    ("fmt", "save", "name"),
    [
        ("PNG", {}, "png"),
        ("JPEG", {}, "jpeg"),
        ("JPEG", {"progressive": True}, "jpeg"),
        ("WEBP", {"lossless": False}, "webp"),
        ("WEBP", {"lossless": True}, "webp"),
        ("GIF", {}, "gif"),
    ],
)
@pytest.mark.parametrize(("width", "height"), [(1, 1), (317, 211), (2000, 3)])
def test_each_format_reads_its_size_from_a_real_file(
    fmt: str, save: dict[str, object], name: str, width: int, height: int
) -> None:
    size = image_size(encoded(width, height, fmt, **save))
    assert (size.format, size.width, size.height) == (name, width, height)


def test_extended_webp_and_jpeg_behind_large_metadata() -> None:
    # an animated WebP is written with a VP8X header (its canvas)
    frames = [Image.new("RGB", (300, 120), c) for c in ((255, 0, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, "WEBP", save_all=True, append_images=frames[1:])
    assert out.getvalue()[12:16] == b"VP8X"
    assert (image_size(out.getvalue()).width, image_size(out.getvalue()).height) == (300, 120)
    # a JPEG whose frame header comes after 60 kB of EXIF-like metadata: found from the data: URL,
    # which is decoded in growing steps until the header is in
    jpeg = encoded(640, 480, "JPEG")
    app1 = b"\xff\xe1" + struct.pack(">H", 60_002) + b"Exif\x00\x00" + bytes(59_994)
    padded = jpeg[:2] + app1 + jpeg[2:]
    assert Image.open(io.BytesIO(padded)).size == (640, 480)
    with pytest.raises(Truncated):
        image_size(padded[:4000])
    size = data_url_size(data_url(padded, "image/jpeg"))
    assert (size.width, size.height) == (640, 480)


def test_a_gif_frame_larger_than_its_screen_counts() -> None:
    gif = bytearray(encoded(10, 10, "GIF"))
    at = gif.index(b"\x2c")  # the first image descriptor: say the frame is 5000 x 4000 at (0, 0)
    gif[at + 5 : at + 9] = struct.pack("<HH", 5000, 4000)
    size = image_size(bytes(gif))
    assert (size.width, size.height) == (5000, 4000)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_truncated_headers_are_refused(fmt: str) -> None:
    raw = encoded(64, 64, fmt)
    for cut in (0, 3, 11, 20):
        with pytest.raises(ValueError, match=r"\w"):
            image_size(raw[:cut])


def test_lying_headers_are_refused_or_measured_as_declared() -> None:
    png = bytearray(encoded(8, 8, "PNG"))
    png[16:24] = struct.pack(">II", 60_000, 60_000)  # a tiny file declaring 3.6 gigapixels
    assert image_size(bytes(png)).pixels == 3_600_000_000
    png[16:24] = struct.pack(">II", 0, 10)
    with pytest.raises(ValueError, match="0 x 10"):
        image_size(bytes(png))
    png = bytearray(encoded(8, 8, "PNG"))
    png[12:16] = b"IDAT"  # the first chunk is not the header
    with pytest.raises(ValueError, match="IHDR"):
        image_size(bytes(png))
    with pytest.raises(ValueError, match="not a PNG, JPEG, WebP or GIF"):
        image_size(b"<svg xmlns='http://www.w3.org/2000/svg'></svg>")
    jpeg = bytearray(encoded(8, 8, "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    del jpeg[sof:]  # no frame header before the end
    with pytest.raises(Truncated):
        image_size(bytes(jpeg))


def test_request_checks_count_measure_and_refuse_remote_urls() -> None:
    small = data_url(encoded(400, 300, "PNG"))
    assert check_images(chat(small, small), max_images=4, max_pixels=16_777_216) is None
    assert check_images({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, 4, 1000) is None

    too_many = check_images(chat(*[small] * 5), max_images=4, max_pixels=16_777_216)
    assert too_many is not None and too_many.code == "too_many_images" and "at most 4" in too_many.message
    none_allowed = check_images(chat(small), max_images=0, max_pixels=16_777_216)
    assert none_allowed is not None and none_allowed.code == "images_not_supported"

    png = bytearray(encoded(8, 8, "PNG"))
    png[16:24] = struct.pack(">II", 12_000, 12_000)
    big = check_images(chat(small, data_url(bytes(png))), max_images=4, max_pixels=16_777_216)
    assert big is not None and big.code == "image_too_large"
    assert "12000 x 12000" in big.message and "16.8 megapixels" in big.message
    assert big.param == "messages[0].content[1].image_url"
    photo = data_url(encoded(4000, 3000, "JPEG"), "image/jpeg")
    assert check_images(chat(photo), max_images=4, max_pixels=16_777_216) is None

    for url in ("http://example.com/cat.png", "HTTPS://example.com/cat.png", "file:///etc/passwd"):
        remote = check_images(chat(url), 4, 16_777_216)
        assert remote is not None and remote.code == "image_url_not_supported" and "data: URL" in remote.message
    video = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "http://x/v"}}]}]}
    refused = check_images(video, 4, 16_777_216) or pytest.fail("a video passed")
    assert refused.code == "modality_not_supported" and refused.param == "messages[0].content[0]"
    assert "takes text and images only" in refused.message
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    spoken = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, audio]}]}
    assert (check_images(spoken, 4, 16_777_216) or pytest.fail("audio passed")).code == "modality_not_supported"

    for url in ("data:image/png;base64,AAAA", "data:image/png,rawbytes", "data:image/png;base64,!!!!", "data:"):
        bad = check_images(chat(url), 4, 16_777_216)
        assert bad is not None and bad.code == "invalid_image", url
    string_form = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": small}]}]}
    assert check_images(string_form, 4, 16_777_216) is None
    wrong_shape = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"u": 1}}]}]}
    assert (check_images(wrong_shape, 4, 10**8) or pytest.fail("passed")).code == "invalid_image_url"
