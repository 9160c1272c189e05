"""Opening image files safely: one size guard for every place that decodes an image.

A PNG or JPEG header can claim any size; decoding a 20000x20000 "image bomb" takes gigabytes. Every reader
in spade (datasets, the command line, evaluation, pseudo-labelling, serving, the studio) opens images
through `open_image`, which reads the header, refuses an image with more than the limit of pixels with
`ImageTooLarge` (a SpadeError naming the file, its size and the limit) and only then decodes it.

The limit is `max_pixels()`: 8192 x 8192 = 67,108,864 pixels unless the environment variable
SPADE_MAX_IMAGE_PIXELS says otherwise; a caller may pass a tighter one (the serving API's request limit).
Pillow's own bomb check (warning above 89 Mpx, error above 179 Mpx) stays in force underneath; its warning
is silenced because this guard decides, and its error is reported as `ImageTooLarge` too. Only a
SPADE_MAX_IMAGE_PIXELS above Pillow's threshold raises Pillow's (Image.MAX_IMAGE_PIXELS) to match.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from spade.errors import SpadeError

DEFAULT_MAX_PIXELS = 8192 * 8192
# The formats spade reads (spade.data.suffixes.IMAGE_SUFFIXES). Others are not even tried: some decode
# inside Image.open, before any size can be checked (an ICO holding a huge PNG, for one).
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
ENV_NAME = "SPADE_MAX_IMAGE_PIXELS"
# What a damaged or non-image file raises while its header is read or its pixels are decoded.
READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)

warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageTooLarge(SpadeError):
    """An image whose header claims more pixels than the limit; nothing of it was decoded."""

    def __init__(self, name: str, what: str, pixels: int, limit: int, size: tuple[int, int] | None = None) -> None:
        self.pixels, self.limit, self.size = pixels, limit, size
        shown = f"{size[0]}x{size[1]} = {pixels} pixels" if size else f"{pixels} pixels"
        super().__init__(
            f"{name}: {what} is {shown}, more than the limit of {limit}; it is refused before decoding "
            f"(set {ENV_NAME} to raise the limit)"
        )


class UnreadableImage(SpadeError):
    """A file that is missing, not an image, or damaged; `reason` says which."""

    def __init__(self, name: str, what: str, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{name}: cannot read {what} ({reason})" if reason != "no such file" else f"{name}: {reason}")


def max_pixels() -> int:
    """The decode limit in pixels: SPADE_MAX_IMAGE_PIXELS, else DEFAULT_MAX_PIXELS."""
    value = os.environ.get(ENV_NAME, "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(value.replace("_", ""))
    except ValueError:
        limit = 0
    if limit < 1:
        raise SpadeError(f"{ENV_NAME} must be a positive number of pixels, not {value!r}")
    return limit


@contextmanager
def open_image(
    source: str | Path | bytes, *, what: str = "image", name: str | None = None, limit: int | None = None
) -> Iterator[Image.Image]:
    """The image at `source` (a path or the file's bytes), its size checked before it is decoded.

    The limit is max_pixels(), or `limit` where that is lower (a caller's own budget, such as a server's).

    The pixels are loaded before the image is handed over, so every decoding problem surfaces here:
    a missing file, a non-image (or an image in a format outside FORMATS) and a truncated one raise
    SpadeError naming `name` (default: the path) and `what` it was meant to be; a too large one raises
    ImageTooLarge.
    """
    limit = max_pixels() if limit is None else min(limit, max_pixels())
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit  # Pillow errors at twice its limit: never below the one asked for
    if name is None:
        name = "the uploaded data" if isinstance(source, bytes) else str(source)
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=FORMATS)
    except FileNotFoundError:
        raise UnreadableImage(name, what, "no such file") from None
    except Image.DecompressionBombError as exc:  # Pillow's own check, at twice its limit: the size is in its text
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise ImageTooLarge(name, what, int(found.group(1)) if found else limit + 1, limit) from None
    except READ_ERRORS as exc:
        raise UnreadableImage(name, what, f"{type(exc).__name__}: {exc}") from None
    with img:
        width, height = img.size
        if width * height > limit:
            raise ImageTooLarge(name, what, width * height, limit, (width, height))
        try:
            img.load()
        except READ_ERRORS as exc:
            raise UnreadableImage(name, what, f"{type(exc).__name__}: {exc}") from None
        yield img
