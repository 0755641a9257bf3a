"""Uploads must be proven to decode, with bounded work, before they are stored or sent to hiapi.

Every file here is generated for real: PNGs chunk by chunk with ``zlib`` (so the decompression
bomb is an honest 8x8 PNG whose IDAT inflates to 200 MiB, a 207 KB file), JPEGs and WebPs with
Pillow, then cut or patched. The unit tests call ``inspect_image``; the HTTP tests go through
the real ``POST /v1/images`` of a real server on SQLite and Postgres and check that a refused
upload leaves no file under the storage's images directory and no ``images`` row.
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import func, select

from app import images
from app.models import Image as ImageRow
from tests.conftest import Service

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(
    width: int,
    height: int,
    idat: bytes,
    *,
    depth: int = 8,
    colour: int = 2,
    interlace: int = 0,
    extra: bytes = b"",
) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return SIGNATURE + chunk(b"IHDR", header) + extra + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def zeros_zlib(mib: int) -> bytes:
    """A zlib stream of ``mib`` MiB of zeros, built in ~0.1 s: after a full flush, deflate's
    output for each further MiB of zeros is the same bytes, so it is repeated."""
    zero = bytes(1 << 20)
    deflater = zlib.compressobj(9)
    first = deflater.compress(zero) + deflater.flush(zlib.Z_FULL_FLUSH)
    block = deflater.compress(zero) + deflater.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(mib):
        adler = zlib.adler32(zero, adler)
    return first + block * (mib - 1) + b"\x03\x00" + struct.pack(">I", adler)  # final block


@cache
def bomb() -> bytes:
    """The issue's bomb: an 8x8 RGB PNG whose IDAT inflates to 200 MiB."""
    data = png(8, 8, zeros_zlib(200))
    assert len(data) < 250_000
    return data


def adam7_rows(width: int, height: int, bytes_per_pixel: int) -> bytes:
    """Filtered scanlines of an Adam7-interlaced image (filter 0, a gradient)."""
    out = bytearray()
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4)) + (
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ):
        cols = range(x0, width, dx)
        for y in range(y0, height, dy):
            if len(cols):
                out.append(0)
                for x in cols:
                    out += bytes([(x * 7 + y * 3) % 256] * bytes_per_pixel)
    return bytes(out)


def encoded(mode: str, size: tuple[int, int], fmt: str, **options: Any) -> bytes:
    picture = Image.linear_gradient("L").resize(size).convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def photo(fmt: str, size: tuple[int, int] = (1920, 1080)) -> bytes:
    picture = Image.blend(
        Image.effect_mandelbrot(size, (-2.2, -1.2, 1.0, 1.2), 60).convert("RGB"),
        Image.effect_noise(size, 40).convert("RGB"),
        0.3,
    )
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


def with_broken_idat(data: bytes) -> bytes:
    """``data`` (a PNG) with bytes in the middle of its IDAT flipped and the CRC made right
    again, so only decoding the pixels can tell."""
    start = data.index(b"IDAT") - 4
    (length,) = struct.unpack_from(">I", data, start)
    body = bytearray(data[start + 8 : start + 8 + length])
    for i in range(len(body) // 2, len(body) // 2 + 8):
        body[i] ^= 0x5A
    return data[:start] + chunk(b"IDAT", bytes(body)) + data[start + 12 + length :]


def with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0) claims ``width`` x ``height``."""
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


# --- unit: inspect_image ------------------------------------------------------------------


def test_the_200_mib_bomb_is_refused_after_inflating_a_few_kib():
    with pytest.raises(images.ImageTooLarge, match="decompression bomb"):
        images.inspect_image(bomb())
    # How far the check inflated, seen without a clock: past the point where the stream
    # breaks, inflating fails ("does not inflate", 415). Broken only in its checksum (after
    # all 200 MiB), or within its first MiB, the bomb is still refused as a bomb.
    stream = zeros_zlib(200)
    bad_checksum = stream[:-4] + bytes(b ^ 0xFF for b in stream[-4:])
    broken_in_1st_mib = zeros_zlib(2)[: len(stream) // 200] + b"\xff" * 64  # block type 3
    for idat in (bad_checksum, broken_in_1st_mib):
        with pytest.raises(images.ImageTooLarge, match="decompression bomb"):
            images.inspect_image(png(8, 8, idat))


def test_pixel_data_just_past_what_the_dimensions_need_is_refused():
    rows = 64 * (1 + 64 * 3)
    exact = png(64, 64, zlib.compress(bytes(rows)))
    assert images.inspect_image(exact).width == 64
    slack = rows // 64 + 4096
    with pytest.raises(images.ImageTooLarge):
        images.inspect_image(png(64, 64, zlib.compress(bytes(rows + slack + 1))))


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("1", {}),
        ("L", {}),
        ("LA", {}),
        ("P", {}),
        ("RGB", {}),
        ("RGBA", {}),
        ("I;16", {}),
        ("RGB", {"optimize": True}),
    ],
)
def test_every_png_kind_that_decodes_is_accepted(mode: str, options: dict[str, Any]):
    data = encoded(mode, (97, 61), "PNG", **options)
    info = images.inspect_image(data)
    assert (info.content_type, info.width, info.height) == ("image/png", 97, 61)


def test_interlaced_pngs_are_measured_per_adam7_pass():
    for width, height in ((1, 1), (3, 5), (9, 9), (37, 23)):
        rows = adam7_rows(width, height, 3)
        assert images.png_pixel_bytes(width, height, 24, True) == len(rows)
        data = png(width, height, zlib.compress(rows), interlace=1)
        assert images.inspect_image(data).width == width
        with Image.open(io.BytesIO(data)) as decoded:  # Pillow reads it as we measured it
            decoded.load()
    bigger = adam7_rows(37, 23, 3) + bytes(200_000)
    with pytest.raises(images.ImageTooLarge):
        images.inspect_image(png(37, 23, zlib.compress(bigger), interlace=1))


def test_normal_photos_are_accepted():
    for fmt, kind in (("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")):
        info = images.inspect_image(photo(fmt, (640, 360)))
        assert (info.content_type, info.width, info.height) == (kind, 640, 360)


def test_over_max_pixels_is_refused_before_decoding():
    assert 8000 * 6000 > images.MAX_PIXELS
    cases = {
        "PNG header": png(8000, 6000, zlib.compress(bytes(100))),
        "JPEG frame header": with_jpeg_size(encoded("RGB", (16, 16), "JPEG"), 8000, 6000),
    }
    for data in cases.values():
        with pytest.raises(images.ImageTooLarge, match="pixels"):
            images.inspect_image(data)


@pytest.mark.parametrize(
    "case",
    [
        "jpeg cut in half",
        "progressive jpeg cut in half",
        "png cut in half",
        "png with a bad idat",
        "png whose pixel data ends early",
        "png without iend",
        "webp cut in half",
        "png with a bad crc",
    ],
)
def test_truncated_or_corrupt_images_are_refused(case: str):
    jpeg = photo("JPEG", (320, 200))
    progressive = encoded("RGB", (320, 200), "JPEG", progressive=True)
    good_png = encoded("RGB", (320, 200), "PNG")
    webp = photo("WEBP", (320, 200))
    data = {
        "jpeg cut in half": jpeg[: len(jpeg) // 2],
        "progressive jpeg cut in half": progressive[: len(progressive) // 2],
        "png cut in half": good_png[: len(good_png) // 2],
        "png with a bad idat": with_broken_idat(good_png),
        "png whose pixel data ends early": png(40, 40, zlib.compress(bytes(20 * (1 + 40 * 3)))),
        "png without iend": good_png[: good_png.index(b"IEND") - 4],
        "webp cut in half": webp[: len(webp) // 2],
        "png with a bad crc": good_png[:-1] + bytes([good_png[-1] ^ 1]),
    }[case]
    with pytest.raises(images.NotAnImage) as refused:
        images.inspect_image(data)
    assert type(refused.value) is images.NotAnImage, "a corrupt image is a 415, not a 413"


def test_compressed_metadata_bombs_and_animated_pngs_are_refused():
    rows = zlib.compress(bytes(8 * (1 + 8 * 3)))
    ztxt = chunk(b"zTXt", b"Comment\x00\x00" + zeros_zlib(2))
    itxt = chunk(b"iTXt", b"Comment\x00\x01\x00en\x00\x00" + zeros_zlib(2))
    iccp = chunk(b"iCCP", b"icc\x00\x00" + zeros_zlib(2))
    for extra in (ztxt, itxt, iccp):
        with pytest.raises(images.ImageTooLarge, match="inflates"):
            images.inspect_image(png(8, 8, rows, extra=extra))
    small_text = chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"hello"))
    assert images.inspect_image(png(8, 8, rows, extra=small_text)).width == 8

    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(images.NotAnImage, match="animated"):
        images.inspect_image(buffer.getvalue())


# --- through the real POST /v1/images -------------------------------------------------------


async def stored_images(service: Service) -> tuple[list[str], int]:
    folder = service.settings.STORAGE_DIR / "images"
    files = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    async with service.ctx.sessionmaker() as session:
        rows = await session.scalar(select(func.count()).select_from(ImageRow))
    return files, int(rows or 0)


async def test_a_bomb_is_413_and_nothing_is_stored(service: Service):
    response = await service.client.post(
        "/v1/images", files={"file": ("still.png", bomb(), "image/png")}
    )
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "image_too_large"
    assert "decompression bomb" in error["message"] and "8x8" in error["message"]
    assert await stored_images(service) == ([], 0)


async def test_corrupt_and_oversized_uploads_are_refused_and_nothing_is_stored(service: Service):
    jpeg = photo("JPEG", (320, 200))
    cases = {
        "jpeg cut in half": (jpeg[: len(jpeg) // 2], 415, "unsupported_image"),
        "png with a bad idat": (
            with_broken_idat(encoded("RGB", (320, 200), "PNG")),
            415,
            "unsupported_image",
        ),
        "8000x6000 pixels": (
            with_jpeg_size(encoded("RGB", (16, 16), "JPEG"), 8000, 6000),
            413,
            "image_too_large",
        ),
    }
    failures = []
    for case, (data, status, code) in cases.items():
        response = await service.client.post(
            "/v1/images", files={"file": ("still.bin", data, "application/octet-stream")}
        )
        if response.status_code != status:
            failures.append(f"{case}: {response.status_code} {response.text[:200]}")
        elif response.json()["error"]["code"] != code:
            failures.append(f"{case}: code {response.json()['error']['code']!r}")
    assert not failures, "\n".join(failures)
    assert await stored_images(service) == ([], 0)

    good = await service.client.post(
        "/v1/images", files={"file": ("photo.jpg", photo("JPEG"), "image/jpeg")}
    )
    assert good.status_code == 201, good.text
    assert (good.json()["width"], good.json()["height"]) == (1920, 1080)
    files, rows = await stored_images(service)
    assert len(files) == 1 and rows == 1
