"""`spade studio`: the GauGAN painter page, served by a small stdlib HTTP server.

The page (``studio_static/``) paints a label map of class values on a canvas at the
model's size and asks this server for the synthesized image. The server answers from
one of two backends:

- `InProcessBackend`: a `SynthesisService` loaded here from a checkpoint; model calls
  are serialized with a lock;
- `EndpointBackend`: a TorchServe (or any compatible) endpoint, e.g.
  ``http://127.0.0.1:8080/predictions/spade``; the browser only talks to this server,
  which forwards requests with the token, so the token never reaches the page.

Routes: ``GET /`` (the page), ``GET /static/NAME``, ``GET /api/info`` (classes,
colours, sizes), ``POST /api/synthesize`` (JSON fields -> PNG, or a JSON error with
a 4xx/5xx status), ``POST /api/label`` (an uploaded label map -> class values at the
model's size), ``GET /healthz``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from spade.config import add_precision_argument
from spade.errors import SpadeError
from spade.serve.protocol import DEFAULT_MAX_PIXELS, RequestError, Response, decode_base64, decode_image

STATIC_DIR = Path(__file__).with_name("studio_static")
DEFAULT_MAX_BODY = 32 * 1024 * 1024
DRAIN_LIMIT = 256 * 1024 * 1024  # a larger unwanted body is not read: the connection is closed instead
DEFAULT_TIMEOUT = 120.0
TOKEN_ENV = "SPADE_STUDIO_TOKEN"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}
SYNTH_FIELDS = ("label_values", "width", "height", "label", "seed", "style")
COLOUR_TOLERANCE = 40.0  # RGB distance within which a pixel counts as a palette colour
MAX_UNMATCHED = 0.01  # fraction of pixels that may match no palette colour (anti-aliased edges)
DONTCARE_COLOUR = (0, 0, 0)  # as spade.visualize draws it

EXAMPLES = """examples:
  # run the model in this process (CPU, or CUDA when available)
  spade studio --checkpoint runs/demo/final.pt
  spade studio --checkpoint coco_vae.pt --port 8001 --precision bfloat16
  # use a model served by TorchServe (see `spade package`); the token stays on the server side
  spade studio --endpoint http://127.0.0.1:8080/predictions/spade --token "$(jq -r .inference.key key_file.json)"
  SPADE_STUDIO_TOKEN=... spade studio --endpoint http://gpu-box:8080/predictions/spade
  # then open the printed URL (default http://127.0.0.1:8000/) in a browser
"""


class StudioError(SpadeError):
    """A start-up problem (missing checkpoint, unreachable endpoint, port in use), explained in the message."""


def _json_response(status: int, obj: object) -> Response:
    return Response(status, "application/json", json.dumps(obj).encode())


def _error_response(message: str, status: int) -> Response:
    return Response.error(RequestError(message, status))


# ---------------------------------------------------------------------------- backends


class Backend(Protocol):
    def info(self) -> dict: ...

    def synthesize(self, fields: dict) -> Response: ...

    def describe(self) -> str: ...


def check_info(info: object, source: str) -> dict:
    """The model description the page needs; raises StudioError naming `source` when it is not one."""
    if not isinstance(info, Mapping):
        raise StudioError(f"{source}: the model description is not a JSON object")
    missing = [k for k in ("classes", "width", "height", "multimodal") if k not in info]
    if missing:
        raise StudioError(f"{source}: the model description lacks {', '.join(missing)}")
    classes = info["classes"]
    if not isinstance(classes, list) or not classes:
        raise StudioError(f"{source}: the model description has no classes")
    values = [c.get("value") for c in classes if isinstance(c, Mapping)]
    if len(values) != len(classes) or not all(isinstance(v, int) and 0 <= v <= 254 for v in values):
        raise StudioError(f"{source}: the studio paints 8-bit label maps, so class values must be in 0..254")
    dontcare = info.get("dontcare_value")
    if dontcare is not None and (not isinstance(dontcare, int) or dontcare in values or not 0 <= dontcare <= 255):
        raise StudioError(f"{source}: bad dontcare_value {dontcare!r}")
    return dict(info)


class InProcessBackend:
    """A `SynthesisService` in this process; one model call at a time."""

    def __init__(self, service, source: str = "checkpoint") -> None:  # noqa: ANN001 - a SynthesisService
        self.service = service
        self.source = source
        self._lock = threading.Lock()
        self._info: dict | None = None

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, device: str = "cpu", precision: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> InProcessBackend:
        from spade.serve.service import SynthesisService

        path = Path(path)
        if not path.exists():
            raise StudioError(f"{path}: no such checkpoint file")
        if not path.is_file():
            raise StudioError(f"{path}: is not a checkpoint file (a directory?)")
        service = SynthesisService(path, device=device, precision=precision, max_pixels=max_pixels)
        return cls(service, source=str(path))

    def info(self) -> dict:
        if self._info is None:
            self._info = check_info(self.service.info(), self.source)
        return self._info

    def synthesize(self, fields: dict) -> Response:
        with self._lock:
            return self.service.handle([fields])[0]

    def describe(self) -> str:
        return f"checkpoint {self.source}"


class EndpointBackend:
    """A TorchServe-compatible endpoint: POST JSON fields -> PNG; POST {"describe": true} -> the model's info."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not url.startswith(("http://", "https://")):
            raise StudioError(f"--endpoint must be an http:// or https:// URL, got {url!r}")
        self.url = url
        self.token = token or None
        self.timeout = timeout
        self._info: dict | None = None

    def _post(self, body: dict, timeout: float) -> tuple[int, str, bytes]:
        """POST JSON -> (status, content type, body) for any HTTP answer; OSError / HTTPException when none came."""
        headers = {"Content-Type": "application/json", "Accept": "image/png, application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.headers.get("Content-Type", ""), resp.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.headers.get("Content-Type", "") if err.headers else "", err.read()

    def info(self) -> dict:
        if self._info is not None:
            return self._info
        try:
            status, _, body = self._post({"describe": True}, timeout=min(self.timeout, 30.0))
        except (OSError, http.client.HTTPException) as exc:
            raise StudioError(f"cannot reach the endpoint {self.url}: {_reason(exc)}") from None
        if status >= 400:
            message = _upstream_message(body)
            hint = {
                401: "; is --token (or $" + TOKEN_ENV + ") the inference key?",
                403: "; is --token (or $" + TOKEN_ENV + ") the inference key?",
                404: "; is the model registered under that name?",
                503: "; is the model still loading?",
            }.get(status, "; was the model archive built by this version of spade (it must answer 'describe')?")
            raise StudioError(
                f"the endpoint {self.url} answered the model description request with HTTP {status}: {message}{hint}"
            )
        try:
            info = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise StudioError(
                f"the endpoint {self.url} answered the model description request with non-JSON ({body[:80]!r})"
            ) from None
        self._info = check_info(info, self.url)
        return self._info

    def synthesize(self, fields: dict) -> Response:
        try:
            status, content_type, data = self._post(fields, timeout=self.timeout)
        except TimeoutError:
            return _error_response(f"the endpoint {self.url} did not answer within {self.timeout:g} s", 504)
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(getattr(exc, "reason", None), TimeoutError):
                return _error_response(f"the endpoint {self.url} did not answer within {self.timeout:g} s", 504)
            return _error_response(f"cannot reach the endpoint {self.url}: {_reason(exc)}", 502)
        if status < 400:
            if not content_type.startswith("image/png") and not data.startswith(b"\x89PNG"):
                what = content_type or "no content type"
                return _error_response(f"the endpoint {self.url} answered {what}, not a PNG", 502)
            return Response(status, "image/png", data)
        message = _upstream_message(data)
        if status in (401, 403):
            return _error_response(f"the endpoint refused the studio's token (HTTP {status}): {message}", 502)
        if status == 404:
            return _error_response(f"the endpoint {self.url} was not found (HTTP 404): {message}", 502)
        if status >= 500:
            return _error_response(f"the endpoint failed (HTTP {status}): {message}", 502)
        return _error_response(message, status)

    def describe(self) -> str:
        return f"endpoint {self.url}" + (" (with token)" if self.token else "")


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    if isinstance(reason, TimeoutError):
        return "timed out"
    return str(reason) or type(reason).__name__


def _upstream_message(body: bytes) -> str:
    """The message of a service / TorchServe JSON error body, else the start of the text."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        text = body.decode("utf-8", errors="replace").strip()
        return text[:300] or "(empty answer)"
    if isinstance(obj, Mapping):
        for key in ("error", "message"):
            if isinstance(obj.get(key), str):
                return obj[key]
    return json.dumps(obj)[:300]


# ---------------------------------------------------------------------------- label maps


def _int(value: object, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(f"'{name}' must be an integer in {low}..{high}, got {value!r}")
    return value


def values_png(values: bytes, width: int, height: int) -> bytes:
    """Raw uint8 class values (row-major, width x height) -> a single-channel (mode L) PNG."""
    if len(values) != width * height:
        raise RequestError(f"'label_values' has {len(values)} bytes, but {width}x{height} needs {width * height}")
    buf = io.BytesIO()
    Image.frombytes("L", (width, height), values).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def synthesis_fields(body: Mapping, info: Mapping) -> dict:
    """The studio's synthesize request -> the service's fields (label PNG and style as base64, seed)."""
    unknown = sorted(str(k) for k in set(body) - set(SYNTH_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(SYNTH_FIELDS)}")
    max_pixels = int(info.get("max_pixels") or DEFAULT_MAX_PIXELS)
    if body.get("label_values") is not None:
        if body.get("label") is not None:
            raise RequestError("send either 'label_values' or 'label', not both")
        width = _int(body.get("width"), "width", 1, max_pixels)
        height = _int(body.get("height"), "height", 1, max_pixels)
        if width * height > max_pixels:
            raise RequestError(f"{width}x{height} is {width * height} pixels; the limit is {max_pixels}", 413)
        label = values_png(decode_base64(body["label_values"], "label_values"), width, height)
    elif body.get("label") is not None:
        label = decode_base64(body["label"], "label")
    else:
        raise RequestError(
            "missing 'label_values' (base64 of the uint8 class values, with width and height) or 'label'"
        )
    fields: dict = {"label": _text(label)}
    if body.get("seed") is not None and info.get("multimodal"):
        fields["seed"] = body["seed"]
    if body.get("style") is not None:
        if not info.get("multimodal"):
            raise RequestError("this model has no image encoder, so it cannot take a style image")
        fields["style"] = _text(decode_base64(body["style"], "style"))
    return fields


def _text(data: bytes) -> str:
    """Images travel to the backends as base64 text, as JSON clients send them to TorchServe."""
    return base64.b64encode(data).decode("ascii")


def _palette(info: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(K, 3) colours and their (K,) class values; the don't-care colour last when the model has one."""
    colours = [c["colour"] for c in info["classes"]]
    values = [c["value"] for c in info["classes"]]
    if info.get("dontcare_value") is not None:
        colours.append(DONTCARE_COLOUR)
        values.append(info["dontcare_value"])
    return np.asarray(colours, np.float32).reshape(-1, 3), np.asarray(values, np.int64)


def _map_colours(rgb: np.ndarray, info: Mapping) -> np.ndarray | None:
    """An (H, W, 3) image painted with the palette's colours -> class values; None when it is not one."""
    colours, values = _palette(info)
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    uniq, inverse = np.unique(packed.ravel(), return_inverse=True)
    uniq_rgb = np.stack([(uniq >> 16) & 255, (uniq >> 8) & 255, uniq & 255], axis=1).astype(np.float32)
    dist = np.linalg.norm(uniq_rgb[:, None, :] - colours[None, :, :], axis=2)
    nearest = dist.argmin(axis=1)
    far = dist[np.arange(len(uniq)), nearest] > COLOUR_TOLERANCE
    unmatched = np.bincount(inverse.ravel(), minlength=len(uniq))[far].sum()
    if unmatched > MAX_UNMATCHED * packed.size:
        return None
    return values[nearest][inverse].reshape(packed.shape)


def decode_label(data: bytes, info: Mapping) -> tuple[np.ndarray, dict]:
    """An uploaded label map -> (H, W) uint8 class values at the model's size, and notes for the page.

    Single-channel images (PNG mode L, P, I) hold class values; a colour image is
    read back through the palette's colours (the page's own "save painting" output,
    or a map coloured with the model's class colours).
    """
    max_pixels = int(info.get("max_pixels") or DEFAULT_MAX_PIXELS)
    img = decode_image(data, "the image", max_pixels)
    source_size = img.size
    kind = "values"
    if img.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        raw = np.asarray(img, dtype=np.int64)
    elif img.mode == "LA":
        raw = np.asarray(img.getchannel("L"), dtype=np.int64)
    else:
        rgb = np.asarray(img.convert("RGB"))
        mapped = _map_colours(rgb, info)
        if mapped is not None:
            raw, kind = mapped, "colours"
        elif (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            raw = rgb[..., 0].astype(np.int64)  # a grey map of values saved as RGB
        else:
            raise RequestError(
                f"this {img.mode} colour image is not painted with the model's class colours (more than "
                f"{MAX_UNMATCHED:.0%} of its pixels match none); upload a single-channel PNG of class values, "
                "or an image saved from the studio",
                422,
            )
    class_values = {c["value"] for c in info["classes"]}
    dontcare = info.get("dontcare_value")
    allowed = class_values | ({dontcare} if dontcare is not None else set())
    if dontcare is not None and min(class_values) > 0:
        raw = np.where(raw < min(class_values), dontcare, raw)  # e.g. ADE20K's 0 = unlabeled
    present = np.unique(raw)
    bad = [int(v) for v in present if int(v) not in allowed]
    if bad:
        shown = ", ".join(map(str, bad[:12])) + (", ..." if len(bad) > 12 else "")
        lo, hi = min(class_values), max(class_values)
        extra = f" or {dontcare} (don't care)" if dontcare is not None else " (this model has no don't-care value)"
        raise RequestError(f"label values {shown} are not classes of this model (valid: {lo}..{hi}{extra})", 422)
    width, height = int(info["width"]), int(info["height"])
    if raw.shape != (height, width):
        resized = Image.fromarray(raw.astype(np.int32), mode="I").resize((width, height), Image.NEAREST)
        raw = np.asarray(resized, dtype=np.int64)
    notes = {"kind": kind, "source_size": list(source_size), "resized": list(source_size) != [width, height]}
    return raw.astype(np.uint8), notes


# ---------------------------------------------------------------------------- HTTP


class StudioServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], backend: Backend, *, max_body: int, quiet: bool) -> None:
        self.backend = backend
        self._live: dict[threading.Thread, socket.socket] = {}
        self._live_lock = threading.Lock()
        self.max_body = max_body
        self.quiet = quiet
        self.info = backend.info()
        self.static = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()} if STATIC_DIR.is_dir() else {}
        if "index.html" not in self.static:
            raise StudioError(f"{STATIC_DIR}: the studio's page is missing (index.html); reinstall spade")
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__(address, StudioHandler)
        self.loopback = _is_loopback(host)

    # Request threads are tracked so that closing the server also ends them (a browser keeps connections
    # open): at exit, a thread still running would be killed mid-way, which can abort the process.

    def process_request(self, request, client_address) -> None:  # noqa: ANN001
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address), daemon=True)
        with self._live_lock:
            self._live[thread] = request
        thread.start()

    def process_request_thread(self, request, client_address) -> None:  # noqa: ANN001
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._live_lock:
                self._live.pop(threading.current_thread(), None)

    def server_close(self) -> None:
        super().server_close()
        with self._live_lock:
            live = list(self._live.items())
        for _, request in live:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)
        for thread, _ in live:
            thread.join(timeout=10)

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return  # the client went away
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]"}


class StudioHandler(BaseHTTPRequestHandler):
    server: StudioServer
    server_version = "spade-studio"
    protocol_version = "HTTP/1.1"

    # ------------------------------------------------------------ plumbing

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if not self.server.quiet or (isinstance(code, int) and code >= 500):
            super().log_request(code, size)

    def _send(self, response: Response, *, extra: Mapping[str, str] | None = None) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def _error(self, message: str, status: int) -> None:
        self._send(_error_response(message, status))

    def _host_ok(self) -> bool:
        """On a loopback bind, refuse other Host names (a DNS-rebinding page cannot reach the backend)."""
        if not self.server.loopback:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in LOOPBACK_NAMES

    def _read_body(self) -> bytes:
        """The request body, within the size limit (a larger one is drained, or the connection closed, and 413)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise RequestError("chunked request bodies are not supported; send Content-Length", 411)
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("a request body with Content-Length is required", 411)
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise RequestError(f"bad Content-Length {length!r}") from None
        if n > self.server.max_body:
            self._drain(n)
            raise RequestError(
                f"the request body is {n / 2**20:.1f} MiB; the studio accepts at most "
                f"{self.server.max_body / 2**20:.1f} MiB (use smaller images, or start it with a larger --max-body-mb)",
                413,
            )
        return self.rfile.read(n)

    def _drain(self, n: int) -> None:
        """Read and drop an unwanted body so that the client sees the answer (browsers fail on a reset socket)."""
        if n > DRAIN_LIMIT:
            self.close_connection = True
            return
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 20))
            if not chunk:
                break
            n -= len(chunk)

    def _discard(self) -> None:
        try:
            self._drain(max(0, int(self.headers.get("Content-Length") or 0)))
        except ValueError:
            self.close_connection = True

    def _read_json(self) -> dict:
        data = self._read_body()
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise RequestError(f"send the request as application/json, not {ctype or 'no content type'}", 415)
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise RequestError(f"the request body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    # ------------------------------------------------------------ routes

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        if not self._host_ok():
            return self._error("unexpected Host header", 403)
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path[len("/static/") :])
        if path == "/api/info":
            info = dict(self.server.info, backend=self.server.backend.describe(), max_body=self.server.max_body)
            return self._send(_json_response(200, info))
        if path == "/healthz":
            return self._send(_json_response(200, {"status": "ok"}))
        if path == "/favicon.ico":
            return self._send(Response(204, "image/x-icon", b""))
        return self._error(f"no such page: {path}", 404)

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        route = self.POST_ROUTES.get(path)
        try:
            if not self._host_ok():
                self._discard()
                raise RequestError("unexpected Host header", 403)
            if route is None:
                self._discard()
                raise RequestError(f"no such API route: POST {path}", 404)
            response = route(self, self._read_json())
        except RequestError as err:
            response = Response.error(err)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
            self.log_error("internal error on POST %s: %r", path, exc)
            response = _error_response(f"internal error: {type(exc).__name__}: {exc}", 500)
        self._send(response)

    def _synthesize(self, body: dict) -> Response:
        return self.server.backend.synthesize(synthesis_fields(body, self.server.info))

    def _label(self, body: dict) -> Response:
        """An uploaded label map (base64 / data URL in "image") -> its class values at the model's size."""
        if set(body) != {"image"}:
            raise RequestError('send {"image": "<base64 or data URL of the label map>"}')
        values, notes = decode_label(decode_base64(body["image"], "image"), self.server.info)
        h, w = values.shape
        payload = dict(notes, width=w, height=h, values=base64.b64encode(values.tobytes()).decode("ascii"))
        return _json_response(200, payload)

    def _label_png(self, body: dict) -> Response:
        """The painted class values -> the single-channel PNG that `spade synthesize --label` reads."""
        if set(body) - {"label_values", "width", "height"}:
            raise RequestError("send label_values, width and height")
        fields = synthesis_fields(body, self.server.info)
        return Response(200, "image/png", base64.b64decode(fields["label"]))

    POST_ROUTES = {"/api/synthesize": _synthesize, "/api/label": _label, "/api/label.png": _label_png}

    def _static(self, name: str) -> None:
        file = self.server.static.get(name)
        if file is None:
            return self._error(f"no such file: {name}", 404)
        ctype = CONTENT_TYPES.get(file.suffix, "application/octet-stream")
        self._send(Response(200, ctype, file.read_bytes()))


def make_server(
    backend: Backend,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    quiet: bool = True,
) -> StudioServer:
    """A studio server bound to (host, port) (port 0: any free port; see `server.url`); call serve_forever()."""
    try:
        return StudioServer((host, port), backend, max_body=max_body, quiet=quiet)
    except OSError as exc:
        raise StudioError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, metavar="CKPT", help="run this checkpoint in the studio's process")
    src.add_argument(
        "--endpoint", metavar="URL", help="a TorchServe prediction URL, e.g. http://127.0.0.1:8080/predictions/spade"
    )
    parser.add_argument(
        "--token", metavar="KEY", help=f"the endpoint's inference key, sent as a Bearer token (default: ${TOKEN_ENV})"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000; 0: any free port)")
    add_precision_argument(parser, what="in-process model precision: ")
    parser.add_argument("--device", default="auto", help="in-process device: cpu, cuda, cuda:N or auto (default)")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for the endpoint per image"
    )
    parser.add_argument(
        "--max-body-mb", type=float, default=DEFAULT_MAX_BODY / 2**20, help="largest request body accepted (MiB)"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")


def _device(name: str) -> str:
    from spade.devices import resolve_device

    try:
        return str(resolve_device(name))
    except SpadeError as exc:
        raise StudioError(f"--device: {exc}") from None


def build_backend(args: argparse.Namespace) -> Backend:
    if args.endpoint:
        if args.precision != "auto" or args.device != "auto":
            print(
                "note: --precision and --device apply to --checkpoint only; the endpoint has its own", file=sys.stderr
            )
        backend: Backend = EndpointBackend(args.endpoint, args.token or os.environ.get(TOKEN_ENV), timeout=args.timeout)
    else:
        if args.token:
            raise StudioError("--token is for --endpoint; a --checkpoint runs in this process")
        backend = InProcessBackend.from_checkpoint(
            args.checkpoint, device=_device(args.device), precision=args.precision
        )
    backend.info()  # fail now, clearly, rather than on the first page load
    return backend


def main(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise StudioError(f"--port must be in 0..65535, got {args.port}")
    if args.max_body_mb <= 0 or args.timeout <= 0:
        raise StudioError("--max-body-mb and --timeout must be positive")
    backend = build_backend(args)
    server = make_server(backend, args.host, args.port, max_body=int(args.max_body_mb * 2**20), quiet=not args.verbose)
    info = server.info
    try:
        # the handlers go in before the URL is printed: whoever reads it may signal at once
        with _stop_on_signals(server) as stopping:
            print(
                f"spade studio: {backend.describe()}: {len(info['classes'])} classes, {info['width']}x{info['height']}"
                + (", multi-modal" if info.get("multimodal") else ""),
                flush=True,
            )
            if not server.loopback:
                print(
                    f"warning: listening on {args.host}: anyone who can reach this port can use the model", flush=True
                )
            print(f"serving at {server.url}  (Ctrl-C to stop)", flush=True)
            server.serve_forever()
            if stopping.is_set():
                print("\nstopping", flush=True)
    except KeyboardInterrupt:  # a Ctrl-C just before the handlers are in place (once in, they ignore repeats)
        print("\nstopping", flush=True)
    finally:
        server.server_close()


@contextlib.contextmanager
def _stop_on_signals(server: ThreadingHTTPServer):
    """Ctrl-C / SIGTERM end serve_forever from a helper thread instead of raising KeyboardInterrupt
    wherever the main thread happens to be (inside a lock, say, which would then never be released).
    The first signal stops the server, later ones are ignored; one that comes before serve_forever starts
    makes it return at once. Off the main thread (no handlers can be installed) this does nothing."""
    stopping = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopping
        return
    stopper = threading.Thread(target=server.shutdown, name="studio-stop", daemon=True)

    def on_signal(signum: int, frame: object) -> None:
        if not stopping.is_set():
            stopping.set()
            stopper.start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopping
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # a daemon thread still running at interpreter exit is torn down mid-call, which can abort the
        # process ("terminate called without an active exception"); shutdown() returns once serve_forever has
        if stopper.is_alive():
            stopper.join(timeout=10)


__all__ = [
    "EXAMPLES",
    "EndpointBackend",
    "InProcessBackend",
    "StudioError",
    "StudioServer",
    "add_arguments",
    "decode_label",
    "main",
    "make_server",
]
