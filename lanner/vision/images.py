"""Turn user input (PIL image, bytes, path, data: or file:// URL) into an RGB PIL image, with clear errors."""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import warnings
from urllib.parse import unquote, urlparse

from PIL import Image, ImageOps

MAX_PIXELS = 64 * 1024 * 1024  # well above any VLM's input, far below what exhausts memory
MAX_ASPECT = 200

_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<payload>.*)", re.DOTALL)


def load_image(source, allowed_local_media_path: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A decoded RGB image from a PIL image, encoded bytes, a local path, or a data: / file:// URL.

    Local files (a path or a file:// URL) are read only from inside allowed_local_media_path.
    Remote URLs are refused: the engine fetches nothing. Every problem is a ValueError naming it.
    """
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels)
        image = _load(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _decode(bytes(source), max_pixels)
    elif isinstance(source, (str, os.PathLike)):
        image = _decode(_read(os.fspath(source), allowed_local_media_path), max_pixels)
    else:
        raise ValueError(f"image source must be a PIL image, bytes, a path or a URL, got {type(source).__name__}")
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white, as the HF image processors convert."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def image_digest(image: Image.Image) -> str:
    """sha256 over mode, size and pixels: equal for equal images, however they were encoded."""
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height};".encode())
    if image.palette is not None:  # "P" pixels are palette indices
        digest.update(bytes(image.getpalette() or []))
    digest.update(image.tobytes())
    return digest.hexdigest()


def _read(text, allowed_local_media_path):
    """The encoded bytes a str source names."""
    if text.startswith("data:"):
        return _data_url_bytes(text)
    scheme = urlparse(text).scheme.lower()
    if scheme in ("http", "https"):
        raise ValueError(f"remote image URLs are not supported (the engine fetches nothing): {text[:80]!r}; "
                         "send the image inline as a data:image/...;base64 URL")
    if scheme == "file":
        return _read_local(_file_url_path(text), allowed_local_media_path)
    if len(scheme) > 1:  # one letter is a Windows drive, e.g. C:\image.png
        raise ValueError(f"unsupported image URL scheme {scheme!r}; use a data: or file:// URL")
    return _read_local(text, allowed_local_media_path)


def _data_url_bytes(url):
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise ValueError("malformed data URL: expected data:image/<format>;base64,<data>")
    if not match["mime"].lower().startswith("image/"):
        raise ValueError(f"data URL must hold an image, got media type {match['mime']!r}")
    if "base64" not in match["params"].lower().split(";"):
        raise ValueError("data URL must be base64-encoded (data:image/<format>;base64,<data>)")
    try:
        return base64.b64decode(re.sub(r"\s+", "", match["payload"]), validate=True)
    except binascii.Error as error:
        raise ValueError(f"invalid base64 in image data URL: {error}") from None


def _file_url_path(url):
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"file:// URL must name an absolute local path (file:///...), got {url[:80]!r}")
    return unquote(parsed.path)


def _read_local(path, allowed_local_media_path):
    if allowed_local_media_path is None:
        raise ValueError(f"{path[:80]!r} is read as a local file, and reading local image files is disabled: allow "
                         "a directory with allowed_local_media_path (the server's --allowed-local-media-path), "
                         "or send the image as a data:image/...;base64 URL")
    root = os.path.realpath(allowed_local_media_path)
    real = os.path.realpath(path)  # resolves .. and symlinks, so neither can leave the root
    if os.path.commonpath([root, real]) != root:
        raise ValueError(f"image path {path!r} is outside the allowed local media path {allowed_local_media_path!r}")
    try:
        with open(real, "rb") as file:
            return file.read()
    except OSError as error:
        raise ValueError(f"cannot read image file {path!r}: {error.strerror or error}") from None


def _decode(data, max_pixels):
    """Decode fully (corrupt data fails here, not later), checking the size in the header first."""
    if not data:
        raise ValueError("image data is empty")
    try:
        with warnings.catch_warnings():  # the size is checked below against max_pixels instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ValueError(f"image is too large (over {max_pixels} pixels)") from None
    except Image.UnidentifiedImageError:
        raise ValueError("unsupported or unrecognised image format (or a corrupt header)") from None
    except Exception as error:  # Pillow's parsers raise all sorts on malformed headers
        raise ValueError(f"corrupt or truncated image: {error}") from None
    _check_pixels(image.size, max_pixels)
    return _load(image)


def _load(image):
    try:
        image.load()
    except Exception as error:
        raise ValueError(f"corrupt or truncated image ({image.format or 'in memory'}): {error}") from None
    return image


def _check_pixels(size, max_pixels):
    width, height = size
    if width * height > max_pixels:
        raise ValueError(f"image is too large: {width}x{height} is over the limit of {max_pixels} pixels")
    if min(width, height) < 2 or max(width, height) > MAX_ASPECT * min(width, height):
        # processors scale the short side up to a fixed size: a sliver would become gigapixels
        raise ValueError(f"image of {width}x{height} pixels is too thin: sides of at least 2 pixels and an aspect "
                         f"ratio up to {MAX_ASPECT}:1 are accepted")
