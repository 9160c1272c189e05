"""What the serving pieces exchange: client errors and responses (no torch, so front ends stay light)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from PIL import Image

from spade.errors import SpadeError
from spade.images import ImageTooLarge, UnreadableImage, open_image

DEFAULT_MAX_PIXELS = 4096 * 4096


class RequestError(SpadeError):
    """A client error: `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status

    def to_json(self) -> dict:
        return {"error": str(self), "status": self.status}


@dataclass
class Response:
    """What to send back for one payload: an HTTP status, a content type and a body."""

    status: int
    content_type: str
    body: bytes
    # images synthesized by the forward pass that made this answer's image(s) (the largest, when they span
    # several); 0 when no forward pass made it (an error, a describe answer)
    forward_batch: int = 0

    @classmethod
    def error(cls, err: RequestError) -> Response:
        return cls(err.status, "application/json", json.dumps(err.to_json()).encode())

    @property
    def ok(self) -> bool:
        return self.status < 400


def decode_image(data: bytes, name: str, limit: int) -> Image.Image:
    """An uploaded image file, decoded through spade.images' size guard (`limit` pixels at most, and never
    more than spade.images.max_pixels()).

    Too large: RequestError 413 saying the size and the limit; not an image or damaged: 400 with the reason.
    """
    try:
        with open_image(data, name=name, limit=limit) as img:
            return img.copy()
    except ImageTooLarge as exc:
        size = f"{exc.size[0]}x{exc.size[1]} = " if exc.size else ""
        raise RequestError(f"{name} is {size}{exc.pixels} pixels; the limit is {exc.limit}", 413) from None
    except UnreadableImage as exc:
        raise RequestError(f"{name} is not a readable image ({exc.reason})") from None


def decode_base64(text: object, name: str) -> bytes:
    """Base64 text (or a browser's data: URL; line breaks allowed) -> bytes; RequestError naming the field when not."""
    if not isinstance(text, str):
        raise RequestError(f"'{name}' must be base64 text, got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"'{name}' is not valid base64 text") from None
    if not data:
        raise RequestError(f"'{name}' is empty")
    return data
