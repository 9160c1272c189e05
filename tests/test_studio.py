"""`spade studio`: the HTTP API in-process and through a TorchServe-like endpoint, and the painter page in
a real headless Chromium (painting with the mouse, fill, undo, uploads, seeds)."""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from http_helpers import FakeServer, reply
from spade.checkpoints import Checkpoint
from spade.config import ModelConfig
from spade.nn import ConvEncoder, SPADEGenerator
from spade.serve import studio
from spade.serve.service import SynthesisService
from spade.serve.studio import EndpointBackend, InProcessBackend, StudioError, make_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NAMES = ["sky", "tree", "grass", "water", "mountain", "sand", "road", "house"]
TOKEN = "s3cret-key"
SCREENSHOT_ENV = "SPADE_STUDIO_SCREENSHOT"  # where to keep a screenshot of the painted page, to look at


# ---------------------------------------------------------------------------- models and servers


def tiny_checkpoint(*, vae: bool, **overrides: object) -> Checkpoint:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("custom", ngf=16, spade_hidden=16, z_dim=8, use_vae=vae, **overrides)
    return Checkpoint(
        config=cfg,
        generator=SPADEGenerator.from_config(cfg).state_dict(),
        encoder=ConvEncoder.from_config(cfg).state_dict() if vae else None,
        meta={"class_names": NAMES[: cfg.label_nc]},
    )


@pytest.fixture(scope="module")
def service() -> SynthesisService:
    """Multi-modal, 8 named classes and a don't-care value, 64x64."""
    return SynthesisService(tiny_checkpoint(vae=True, crop_size=64), precision="float32")


@pytest.fixture(scope="module")
def plain_service() -> SynthesisService:
    """Single-modal, 5 classes and no don't-care class, 64x32 (wider than high)."""
    ckpt = tiny_checkpoint(vae=False, label_nc=5, contain_dontcare_label=False, crop_size=64, aspect_ratio=2.0)
    return SynthesisService(ckpt, precision="float32")


class GatedBackend:
    """A backend whose answers can be held back, to see the page's 'generating' state."""

    def __init__(self, inner: InProcessBackend) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()

    def info(self) -> dict:
        return self.inner.info()

    def describe(self) -> str:
        return self.inner.describe()

    def synthesize(self, fields: dict):  # noqa: ANN201
        assert self.gate.wait(20), "the test never opened the gate"
        return self.inner.synthesize(fields)


class Running:
    """An HTTP server serving in a thread; stop() shuts it down and joins the thread."""

    def __init__(self, server: ThreadingHTTPServer) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        host, port = server.server_address[:2]
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@contextlib.contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[Running]:
    running = Running(server)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def gated(service) -> GatedBackend:
    return GatedBackend(InProcessBackend(service, source="tiny.pt"))


@pytest.fixture(scope="module")
def app(gated):
    with serving(make_server(gated, "127.0.0.1", 0)) as running:
        yield running


@pytest.fixture(scope="module")
def plain_app(plain_service):
    with serving(make_server(InProcessBackend(plain_service), "127.0.0.1", 0)) as running:
        yield running


# ---------------------------------------------------------------------------- HTTP helpers


def http(url: str, body: object = None, *, headers: dict | None = None, raw: bytes | None = None):  # noqa: ANN201
    """(status, content type, body bytes) for a GET, or a POST of JSON `body` / `raw` bytes."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, headers=hdrs, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers.get("Content-Type"), err.read()


def synth_body(values: np.ndarray, **extra: object) -> dict:
    h, w = values.shape
    return {
        "label_values": base64.b64encode(values.astype(np.uint8).tobytes()).decode(),
        "width": w,
        "height": h,
        **extra,
    }


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG") if mode else Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def direct(service: SynthesisService, values: np.ndarray, **fields: object) -> np.ndarray:
    """The service's own answer for a label map, to compare the studio's with."""
    (response,) = service.handle([{"label": png(values.astype(np.uint8)), **fields}])
    assert response.status == 200, response.body
    return pixels(response.body)


def scene(h: int = 64, w: int = 64) -> np.ndarray:
    values = np.zeros((h, w), np.uint8)
    values[h // 2 :] = 2
    values[h // 3 : h // 2, w // 4 : w // 2] = 4
    values[-8:, -8:] = 255
    return values


# ---------------------------------------------------------------------------- the HTTP API, in-process


def test_info_page_and_health(app, service):
    status, ctype, body = http(app.url + "/api/info")
    assert status == 200 and ctype == "application/json"
    info = json.loads(body)
    assert info["classes"] == service.info()["classes"]
    assert [c["name"] for c in info["classes"]] == NAMES
    assert (info["width"], info["height"], info["multimodal"], info["dontcare_value"]) == (64, 64, True, 255)
    assert info["max_body"] == studio.DEFAULT_MAX_BODY and "tiny.pt" in info["backend"]
    assert http(app.url + "/healthz")[:2] == (200, "application/json")
    status, ctype, page = http(app.url + "/")
    assert status == 200 and ctype.startswith("text/html") and b'id="canvas"' in page
    status, ctype, _ = http(app.url + "/static/studio.js")
    assert status == 200 and ctype.startswith("text/javascript")
    for path in ("/static/../studio.py", "/static/%2e%2e/studio.py", "/static/nope.js", "/api/nope"):
        status, ctype, body = http(app.url + path)
        assert status == 404 and ctype == "application/json", path
    # a page of another origin that rebinds its DNS name to 127.0.0.1 gets nothing
    assert http(app.url + "/api/info", headers={"Host": "evil.example:80"})[0] == 403


def test_synthesize_matches_the_service_and_seeds_matter(app, service):
    values = scene()
    status, ctype, body = http(app.url + "/api/synthesize", synth_body(values, seed=3))
    assert status == 200 and ctype == "image/png"
    img = pixels(body)
    assert img.shape == (64, 64, 3)
    np.testing.assert_array_equal(img, direct(service, values, seed=3))
    again = pixels(http(app.url + "/api/synthesize", synth_body(values, seed=3))[2])
    other = pixels(http(app.url + "/api/synthesize", synth_body(values, seed=4))[2])
    np.testing.assert_array_equal(img, again)
    assert np.abs(img.astype(int) - other).mean() > 1
    # a PNG label map (base64) works too, and a style image replaces the seed
    style = np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)
    fields = {"label": base64.b64encode(png(values)).decode(), "style": base64.b64encode(png(style)).decode()}
    status, _, styled = http(app.url + "/api/synthesize", fields)
    assert status == 200
    np.testing.assert_array_equal(pixels(styled), direct(service, values, style=png(style)))
    # the label map as the single-channel PNG that `spade synthesize --label` reads
    status, ctype, label_png = http(app.url + "/api/label.png", synth_body(values))
    assert status == 200 and ctype == "image/png"
    with Image.open(io.BytesIO(label_png)) as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), values)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (synth_body(np.full((64, 64), 9)), 400, "label values 9 are out of range"),
        ({"label_values": "AAAA", "width": 64, "height": 64}, 400, "has 3 bytes, but 64x64 needs 4096"),
        ({"label_values": "!!", "width": 64, "height": 64}, 400, "not valid base64"),
        ({"width": 64, "height": 64}, 400, "missing 'label_values'"),
        (synth_body(np.zeros((64, 64)), colour="red"), 400, "unknown field(s) 'colour'"),
        (synth_body(np.zeros((64, 64)), seed=-1), 400, "'seed' must be an integer"),
        (synth_body(np.zeros((64, 64)), style="aGVsbG8="), 400, "'style' is not a readable image"),
        ({"label": base64.b64encode(b"hello").decode()}, 400, "'label' is not a readable image"),
        (["not", "an", "object"], 400, "must be a JSON object"),
    ],
)
def test_synthesize_errors_are_json_4xx(app, body, status, message):
    got, ctype, data = http(app.url + "/api/synthesize", body)
    assert (got, ctype) == (status, "application/json")
    err = json.loads(data)
    assert err["status"] == status and message in err["error"], err


def test_request_format_errors(app, plain_app):
    status, _, data = http(app.url + "/api/synthesize", raw=b"{", headers={})
    assert status == 400 and "not valid JSON" in json.loads(data)["error"]
    status, _, data = http(app.url + "/api/synthesize", raw=b"label=1", headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in json.loads(data)["error"]
    status, _, data = http(app.url + "/api/nope", {"x": 1})
    assert status == 404 and "POST /api/nope" in json.loads(data)["error"]
    # the single-modal model takes no style image
    body = synth_body(np.zeros((32, 64)), style=base64.b64encode(png(np.zeros((8, 8, 3), np.uint8))).decode())
    status, _, data = http(plain_app.url + "/api/synthesize", body)
    assert status == 400 and "no image encoder" in json.loads(data)["error"]


def test_body_over_the_limit_is_refused_and_the_server_goes_on(service):
    server = make_server(InProcessBackend(service), "127.0.0.1", 0, max_body=4096)
    with serving(server) as running:
        status, ctype, data = http(running.url + "/api/synthesize", synth_body(scene()))  # ~5.5 KB of JSON
        assert (status, ctype) == (413, "application/json")
        err = json.loads(data)
        assert err["status"] == 413 and "accepts at most 0.0 MiB" in err["error"] and "--max-body-mb" in err["error"]
        small = synth_body(np.zeros((8, 8)))
        assert http(running.url + "/api/synthesize", small)[0] == 200  # the studio resizes nothing: the service does


def test_label_upload_decodes_values_colours_and_sizes(app, service):
    info = service.info()
    values = scene()

    def upload(data: bytes):  # noqa: ANN202
        status, _, body = http(
            app.url + "/api/label", {"image": "data:image/png;base64," + base64.b64encode(data).decode()}
        )
        return status, json.loads(body)

    status, got = upload(png(values))
    assert status == 200 and (got["kind"], got["width"], got["height"], got["resized"]) == ("values", 64, 64, False)
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(got["values"]), np.uint8).reshape(64, 64), values)
    # a map of twice the size is resized, nearest neighbour
    status, got = upload(png(np.kron(values, np.ones((2, 2), np.uint8))))
    assert status == 200 and got["resized"] and got["source_size"] == [128, 128]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(got["values"]), np.uint8).reshape(64, 64), values)
    # painted with the class colours (don't care black), a little noise as from a lossy save
    table = np.zeros((256, 3), np.uint8)
    for cls in info["classes"]:
        table[cls["value"]] = cls["colour"]
    noisy = np.clip(table[values].astype(int) + np.random.default_rng(1).integers(-6, 7, (64, 64, 3)), 0, 255)
    status, got = upload(png(noisy.astype(np.uint8)))
    assert status == 200 and got["kind"] == "colours"
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(got["values"]), np.uint8).reshape(64, 64), values)
    # not the model's classes, not an image, a photo
    status, got = upload(png(np.full((64, 64), 12, np.uint8)))
    assert status == 422 and "label values 12 are not classes of this model (valid: 0..7 or 255" in got["error"]
    status, got = upload(b"GIF89a nonsense")
    assert status == 400 and "not a readable image" in got["error"]
    status, got = upload(png(np.random.default_rng(2).integers(0, 255, (64, 64, 3), np.uint8)))
    assert status == 422 and "not painted with the model's class colours" in got["error"]
    status, _, data = http(app.url + "/api/label", {"picture": "x"})
    assert status == 400 and '"image"' in json.loads(data)["error"]


# ---------------------------------------------------------------------------- through a TorchServe-like endpoint


class FakeTorchServe(FakeServer):
    """Imitates TorchServe with the spade handler: POST /predictions/spade with a Bearer token; JSON errors.

    `mode`: "ok", "fail" (500 worker died), "slow" (answers after 1 s), "old" (no 'describe' support).
    """

    def __init__(self, service: SynthesisService, token: str = TOKEN) -> None:
        self.service = service
        self.token = token
        self.mode = "ok"
        self.seen: list[tuple[str | None, dict]] = []

    @property
    def url(self) -> str:
        return f"{self.base}/predictions/spade"

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        with contextlib.suppress(ConnectionError):  # the studio gave up waiting
            status, body, ctype = self.answer(h)
            reply(h, status, body, headers=[("Content-Type", ctype)] if ctype else [])

    def answer(self, h: BaseHTTPRequestHandler) -> tuple[int, dict | bytes, str | None]:
        """(status, body, content type: None for a JSON body)."""

        def fail(status: int, kind: str, message: str) -> tuple[int, dict, None]:
            return status, {"code": status, "type": kind, "message": message}, None

        if h.command != "POST":
            return fail(405, "MethodNotAllowedException", f"{h.command} is not allowed")
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        self.seen.append((h.headers.get("Authorization"), body))
        if h.path != "/predictions/spade":
            return fail(404, "ModelNotFoundException", f"Model not found: {h.path}")
        if h.headers.get("Authorization") != f"Bearer {self.token}":
            return fail(401, "InvalidKeyException", "Token Authorization failed. Token either incorrect")
        if self.mode == "fail":
            return fail(500, "InternalServerException", "Worker died.")
        if self.mode == "slow":
            time.sleep(1.0)
        if body == {"describe": True}:
            if self.mode == "old":  # a service from before 'describe'
                return 400, {"error": "unknown field(s) 'describe'; accepted: label, ...", "status": 400}, None
            return 200, self.service.info(), None
        (response,) = self.service.handle([body])
        return response.status, response.body, response.content_type


@pytest.fixture(scope="module")
def torchserve(service):
    with FakeTorchServe(service) as fake:
        yield fake


def test_endpoint_backend_proxies_with_the_token(torchserve, service):
    torchserve.mode = "ok"
    backend = EndpointBackend(torchserve.url, TOKEN)
    with serving(make_server(backend, "127.0.0.1", 0)) as running:
        info = json.loads(http(running.url + "/api/info")[2])
        assert info["classes"] == service.info()["classes"] and "endpoint " + torchserve.url in info["backend"]
        assert TOKEN not in json.dumps(info)  # the page never sees the token
        values = scene()
        torchserve.seen.clear()
        status, ctype, body = http(running.url + "/api/synthesize", synth_body(values, seed=5))
        assert (status, ctype) == (200, "image/png")
        np.testing.assert_array_equal(pixels(body), direct(service, values, seed=5))
        ((auth, sent),) = torchserve.seen
        assert auth == f"Bearer {TOKEN}" and sent["seed"] == 5 and set(sent) == {"label", "seed"}
        # the endpoint's 4xx comes through with its message; its failures become 502 / 504
        status, _, data = http(running.url + "/api/synthesize", synth_body(np.full((64, 64), 9)))
        assert status == 400 and "label values 9 are out of range" in json.loads(data)["error"]
        torchserve.mode = "fail"
        status, _, data = http(running.url + "/api/synthesize", synth_body(values))
        assert status == 502 and "the endpoint failed (HTTP 500): Worker died." in json.loads(data)["error"]
        torchserve.mode = "slow"
        backend.timeout = 0.3
        status, _, data = http(running.url + "/api/synthesize", synth_body(values))
        assert status == 504 and "did not answer within 0.3 s" in json.loads(data)["error"]
    torchserve.mode = "ok"


def test_endpoint_problems_at_start_are_clear(torchserve):
    torchserve.mode = "ok"
    with pytest.raises(StudioError, match=r"HTTP 401: Token Authorization failed.*is --token"):
        EndpointBackend(torchserve.url, "wrong").info()
    with pytest.raises(StudioError, match=r"HTTP 401"):
        EndpointBackend(torchserve.url).info()
    with pytest.raises(StudioError, match=r"HTTP 404: Model not found.*registered"):
        EndpointBackend(torchserve.url.replace("spade", "other"), TOKEN).info()
    torchserve.mode = "old"
    with pytest.raises(StudioError, match=r"HTTP 400: unknown field.*'describe'.*this version of spade"):
        EndpointBackend(torchserve.url, TOKEN).info()
    torchserve.mode = "ok"
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    unreachable = f"http://127.0.0.1:{port}/predictions/spade"
    with pytest.raises(StudioError, match=rf"cannot reach the endpoint {unreachable}: .*refused"):
        EndpointBackend(unreachable).info()
    with pytest.raises(StudioError, match="must be an http"):
        EndpointBackend("127.0.0.1:8080/predictions/spade")


def test_command_line_errors(tmp_path):
    parser = argparse.ArgumentParser(epilog=studio.EXAMPLES)
    studio.add_arguments(parser)
    with pytest.raises(StudioError, match=r"nope\.pt: no such checkpoint file"):
        studio.main(parser.parse_args(["--checkpoint", str(tmp_path / "nope.pt")]))
    with pytest.raises(StudioError, match="--token is for --endpoint"):
        studio.main(parser.parse_args(["--checkpoint", str(tmp_path / "nope.pt"), "--token", "x"]))
    assert "spade studio --endpoint" in studio.EXAMPLES and "spade studio --checkpoint" in studio.EXAMPLES
    assert parser.parse_args(["--checkpoint", "x.pt"]).precision == "auto"
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parser.parse_args(["--checkpoint", "x.pt", "--precision", "float16"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_command_cleanly(tmp_path, service, sig):
    ckpt = service.checkpoint.save(tmp_path / "tiny.pt")
    code = (
        "import argparse, sys; from spade.serve import studio; p = argparse.ArgumentParser(); "
        "studio.add_arguments(p); studio.main(p.parse_args(sys.argv[1:]))"
    )
    cmd = [sys.executable, "-c", code, "--checkpoint", str(ckpt), "--port", "0", "--precision", "float32"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        while not any("serving at" in line for line in lines):
            line = proc.stdout.readline()
            assert line, f"the studio exited early: {''.join(lines)}"
            lines.append(line)
        url = lines[-1].split("serving at ")[1].split()[0]
        assert "8 classes, 64x64, multi-modal" in "".join(lines)
        assert http(url + "healthz")[0] == 200
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=15)
        # SIGTERM's default action would end the process with -15 and no "stopping"
        assert proc.returncode == 0 and "stopping" in out and "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_signals_stop_the_server_from_a_helper_thread(service):
    """No KeyboardInterrupt in the main thread: the first signal shuts the server down (even one that comes
    before serve_forever starts), a repeat is ignored, the previous handlers are put back and the helper
    thread has ended (a daemon thread left running at interpreter exit can abort the process)."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = make_server(InProcessBackend(service), "127.0.0.1", 0)
    watchdog = threading.Timer(20, server.shutdown)  # a broken handler must fail the test, not hang it
    watchdog.start()
    try:
        with studio._stop_on_signals(server) as stopping:
            try:
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGTERM)
            except KeyboardInterrupt:
                pytest.fail("SIGINT raised KeyboardInterrupt in the main thread")
            assert stopping.is_set()
            start = time.monotonic()
            server.serve_forever()
        assert time.monotonic() - start < 10, "serve_forever ran on after the signal"
        assert [t.name for t in threading.enumerate() if t.name == "studio-stop"] == []
    finally:
        watchdog.cancel()
        server.server_close()
    assert {sig: signal.getsignal(sig) for sig in before} == before


# ---------------------------------------------------------------------------- the page, in headless Chromium


@pytest.fixture(scope="module")
def browser():
    # no skipping: the page is part of the product (make tools installs Chromium)
    assert CHROMIUM.exists(), f"no Chromium at {CHROMIUM}; run `make tools` (apt-get install chromium)"
    from playwright import sync_api

    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser, url: str):  # noqa: ANN001, ANN201
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=10_000)
    return context, page, errors


@pytest.fixture
def page(browser, app, gated):
    context, page, errors = open_page(browser, app.url)
    try:
        yield page
        assert not [e for e in errors if "the server responded with a status of 4" not in e], errors
    finally:
        gated.gate.set()
        context.close()


@pytest.fixture
def plain_page(browser, plain_app):
    context, page, errors = open_page(browser, plain_app.url)
    try:
        yield page
        assert not errors, errors
    finally:
        context.close()


def label_values(page) -> np.ndarray:  # noqa: ANN001
    info = page.evaluate("studio.info")
    return np.asarray(page.evaluate("studio.labelValues()"), np.uint8).reshape(info["height"], info["width"])


def canvas_point(page, x: float, y: float) -> tuple[float, float]:  # noqa: ANN001
    """The screen position of the model pixel (x, y) of #canvas."""
    info = page.evaluate("studio.info")
    box = page.locator("#canvas").bounding_box()
    return box["x"] + (x + 0.5) * box["width"] / info["width"], box["y"] + (y + 0.5) * box["height"] / info["height"]


def stroke(page, points: list[tuple[int, int]]) -> None:  # noqa: ANN001
    page.mouse.move(*canvas_point(page, *points[0]))
    page.mouse.down()
    for p in points[1:]:
        page.mouse.move(*canvas_point(page, *p), steps=5)
    page.mouse.up()


def set_brush(page, size: int) -> None:  # noqa: ANN001
    page.locator("#brush-size").evaluate(
        "(el, size) => { el.value = String(size); el.dispatchEvent(new Event('input')); }", size
    )
    assert page.inner_text("#brush-size-value") == str(size)


def dismiss_error(page) -> None:  # noqa: ANN001
    if page.is_visible("#error"):
        page.click("#error-close")
    assert page.is_hidden("#error")


def click_canvas(page, x: int, y: int) -> None:  # noqa: ANN001
    page.mouse.click(*canvas_point(page, x, y))


def pick(page, class_id: int) -> None:  # noqa: ANN001
    page.click(f'#palette button[data-class-id="{class_id}"]')


def generate(page) -> bytes:  # noqa: ANN001
    """Press Generate, wait for the new image, return its PNG bytes."""
    before = int(page.get_attribute("#result", "data-generation") or 0)
    page.click("#generate")
    page.wait_for_selector(f'#result[data-generation="{before + 1}"]', state="attached", timeout=15_000)
    script = """async () => {
        const response = await fetch(document.querySelector('#result').src);
        return Array.from(new Uint8Array(await response.arrayBuffer()));
    }"""
    return bytes(page.evaluate(script))


def canvas_rgb(page, x: int, y: int) -> list[int]:  # noqa: ANN001
    script = "([x, y]) => Array.from(document.querySelector('#canvas').getContext('2d').getImageData(x, y, 1, 1).data)"
    return page.evaluate(script, [x, y])[:3]


def test_paint_generate_and_seeds(page, service, gated, tmp_path):
    info = service.info()
    buttons = page.locator("#palette button")
    assert buttons.count() == 8
    assert [buttons.nth(i).inner_text().strip() for i in range(8)] == NAMES
    assert page.locator("#canvas").evaluate("c => [c.width, c.height]") == [64, 64]
    assert "don't care" in page.inner_text("#eraser-info") and "255" in page.inner_text("#eraser-info")
    assert page.is_enabled("#seed") and page.is_enabled("#style-upload")
    for hidden in ("#style-clear", "#style-preview", "#download", "#result", "#busy", "#error"):
        assert page.is_hidden(hidden), hidden
    assert page.is_visible("#placeholder")
    assert (label_values(page) == 255).all()  # a new map is all "don't care", as the eraser paints

    pick(page, 2)  # grass over the lower half, as a wide brush
    set_brush(page, 20)
    stroke(page, [(0, 54), (20, 54), (40, 54), (63, 54)])
    pick(page, 0)  # sky: fill the rest
    page.click("#tool-fill")
    click_canvas(page, 5, 5)
    page.click("#tool-brush")
    pick(page, 7)  # a house: a thin vertical stroke
    set_brush(page, 4)
    stroke(page, [(30, 20), (30, 30), (30, 40)])
    values = label_values(page)
    assert values[50, 10] == 2 and values[5, 5] == 0 and values[30, 30] == 7 and values[30, 10] == 0
    assert set(np.unique(values)) == {0, 2, 7}
    assert canvas_rgb(page, 30, 30) == info["classes"][7]["colour"]  # the canvas shows the class colours
    assert canvas_rgb(page, 10, 55) == info["classes"][2]["colour"]

    # the generating state, with the answer held back
    assert page.is_hidden("#busy")
    gated.gate.clear()
    page.fill("#seed", "1")
    page.click("#generate")
    page.wait_for_selector("#busy", state="visible")
    assert page.is_disabled("#generate") and "Generating" in page.inner_text("#generate")
    gated.gate.set()
    page.wait_for_selector('#result[data-generation="1"]', state="attached")
    page.wait_for_selector("#busy", state="hidden")
    assert page.is_enabled("#generate") and page.inner_text("#generate") == "Generate"

    size = page.locator("#result").evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size == [info["width"], info["height"]] == [64, 64]
    page.fill("#seed", "1")
    first = generate(page)
    np.testing.assert_array_equal(pixels(first), direct(service, values, seed=1))
    page.fill("#seed", "2")
    second = generate(page)
    assert second != first
    np.testing.assert_array_equal(pixels(second), direct(service, values, seed=2))
    page.fill("#seed", "1")
    assert generate(page) == first
    assert page.is_hidden("#error") and "seed 1" in page.inner_text("#status")

    shot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "studio.png")
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000

    # a style image replaces the seed; a bad seed is an error on the page
    style = np.zeros((48, 48, 3), np.uint8)
    style[:, :, 2] = 200
    page.set_input_files("#style-upload", files=[{"name": "blue.png", "mimeType": "image/png", "buffer": png(style)}])
    page.wait_for_selector("#style-preview", state="visible")
    styled = generate(page)
    np.testing.assert_array_equal(pixels(styled), direct(service, values, style=png(style)))
    page.click("#style-clear")
    assert generate(page) == first
    page.fill("#seed", "-3")
    page.click("#generate")
    page.wait_for_selector("#error", state="visible")
    assert "the seed must be a whole number" in page.inner_text("#error")


def test_undo_redo_fill_and_eraser(page):
    assert page.is_disabled("#undo")
    pick(page, 3)
    page.click("#tool-fill")
    click_canvas(page, 10, 10)  # the whole (don't-care) map becomes 3
    all3 = label_values(page)
    assert (all3 == 3).all()
    page.click("#tool-brush")
    pick(page, 5)
    set_brush(page, 6)
    stroke(page, [(20, 32), (44, 32)])
    with_stroke = label_values(page)
    assert with_stroke[32, 32] == 5 and with_stroke[10, 10] == 3 and (with_stroke == 5).sum() > 100
    # fill the area around the stroke: the stroke stays, everything connected to (2, 2) changes
    pick(page, 6)
    page.click("#tool-fill")
    click_canvas(page, 2, 2)
    filled = label_values(page)
    np.testing.assert_array_equal(filled, np.where(with_stroke == 3, 6, with_stroke))
    click_canvas(page, 2, 2)  # the same class again changes nothing and adds no undo step
    # the eraser paints "don't care" (255)
    page.click("#tool-eraser")
    assert page.get_attribute("#tool-eraser", "aria-pressed") == "true"
    stroke(page, [(5, 60), (15, 60)])
    erased = label_values(page)
    assert erased[60, 10] == 255 and erased[32, 32] == 5
    assert canvas_rgb(page, 10, 60) == [0, 0, 0]

    page.click("#undo")
    np.testing.assert_array_equal(label_values(page), filled)
    page.click("#undo")
    np.testing.assert_array_equal(label_values(page), with_stroke)
    page.keyboard.press("Control+z")
    np.testing.assert_array_equal(label_values(page), all3)
    page.click("#undo")
    assert (label_values(page) == 255).all() and page.is_disabled("#undo")
    page.click("#redo")
    np.testing.assert_array_equal(label_values(page), all3)
    page.keyboard.press("Control+Shift+z")
    np.testing.assert_array_equal(label_values(page), with_stroke)
    # choosing a class while erasing goes back to the brush
    page.click("#tool-eraser")
    pick(page, 1)
    assert page.get_attribute("#tool-brush", "aria-pressed") == "true"


def test_uploads_and_their_errors(page, service):
    info = service.info()
    values = scene()
    page.set_input_files("#label-upload", files=[{"name": "map.png", "mimeType": "image/png", "buffer": png(values)}])
    page.wait_for_function("document.querySelector('#status').textContent.includes('map.png')")
    np.testing.assert_array_equal(label_values(page), values)
    assert page.is_hidden("#error")
    page.click("#undo")
    assert (label_values(page) == 255).all()
    # a colour image painted with the palette (as "Save painting" writes it) maps back to values
    table = np.zeros((256, 3), np.uint8)
    for cls in info["classes"]:
        table[cls["value"]] = cls["colour"]
    colours = png(np.kron(table[values], np.ones((3, 3, 1), np.uint8)))
    page.set_input_files("#label-upload", files=[{"name": "painted.png", "mimeType": "image/png", "buffer": colours}])
    page.wait_for_function("document.querySelector('#status').textContent.includes('mapped the class colours')")
    np.testing.assert_array_equal(label_values(page), values)
    assert "resized from 192x192" in page.inner_text("#status")

    bad = [
        ("notes.png", b"these are not image bytes", "not a readable image"),
        ("wrong.png", png(np.full((64, 64), 40, np.uint8)), "label values 40 are not classes of this model"),
    ]
    for name, data, message in bad:
        dismiss_error(page)
        page.set_input_files("#label-upload", files=[{"name": name, "mimeType": "image/png", "buffer": data}])
        page.wait_for_selector("#error", state="visible")
        text = page.inner_text("#error")
        assert name in text and message in text, text
        np.testing.assert_array_equal(label_values(page), values)  # the map is kept
    dismiss_error(page)
    page.set_input_files("#style-upload", files=[{"name": "style.png", "mimeType": "image/png", "buffer": b"nope"}])
    page.wait_for_selector("#error", state="visible")
    assert "style.png: not a readable image" in page.inner_text("#error")
    assert page.is_hidden("#style-preview")


def test_single_modal_model_without_dontcare(plain_page, plain_service):
    page = plain_page
    info = plain_service.info()
    assert (info["width"], info["height"], info["dontcare_value"]) == (64, 32, None)
    assert page.locator("#palette button").count() == 5
    assert page.is_disabled("#seed") and page.is_disabled("#style-upload")
    assert "no image encoder" in page.inner_text("#mode-note")
    assert "no don't-care class" in page.inner_text("#eraser-info") and "“sky” (value 0)" in page.inner_text(
        "#eraser-info"
    )
    box = page.locator("#canvas").bounding_box()
    assert (box["width"], box["height"]) == (448, 224)  # scaled up 7 times, whole pixels
    pick(page, 4)
    page.click("#tool-fill")
    click_canvas(page, 3, 3)
    page.click("#tool-eraser")
    stroke(page, [(10, 16), (50, 16)])
    values = label_values(page)
    assert values.shape == (32, 64) and values[16, 30] == 0 and values[2, 2] == 4
    result = generate(page)
    assert page.locator("#result").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 32]
    np.testing.assert_array_equal(pixels(result), direct(plain_service, values))
    # live: every finished edit generates
    page.check("#live")
    pick(page, 2)
    page.click("#tool-brush")
    stroke(page, [(5, 5), (5, 25)])
    page.wait_for_selector('#result[data-generation="2"]', state="attached")
    page.click("#undo")
    page.wait_for_selector('#result[data-generation="3"]', state="attached")
    assert generate(page) == result
