"""Real TorchServe on 127.0.0.1 (token authorization on) serving archives built by `spade package`."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from email.message import Message
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from serve_helpers import label_map, make_checkpoint, png
from spade.serve.handler import BATCH_HEADER
from spade.serve.local_torchserve import LocalTorchServe
from spade.serve.package import HANDLER_NAME, SERIALIZED_NAME, ServingOptions, package
from spade.serve.service import SynthesisService
from train_helpers import wait_for

NAME = "tiny"


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def multipart(fields: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = "spade-test-boundary"
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.bin"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + value
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("package")
    ckpt = make_checkpoint(vae=True)
    ckpt.save(root / "model.pt")
    # the command line, as a user runs it
    proc = subprocess.run(
        [sys.executable, "-m", "spade.cli", "package", "--checkpoint", str(root / "model.pt"), "--name", NAME]
        + ["--version", "1.0", "--out", str(root / "dist"), "--batch-size", "4", "--max-batch-delay", "400"]
        + ["--max-pixels", "40000"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tiny.mar" in proc.stdout
    return root / "model.pt", root / "dist"


@pytest.fixture(scope="module")
def server(archive, tmp_path_factory):
    _, dist = archive
    ts = LocalTorchServe(dist, models=[f"{NAME}={NAME}.mar"], workdir=tmp_path_factory.mktemp("ts"))
    with ts:
        yield ts


def predict(server, body: bytes, content_type: str = "image/png", *, token: bool = True) -> tuple[int, Message, bytes]:
    headers = {"Content-Type": content_type, **(server.headers() if token else {})}
    return post(f"{server.inference_url}/predictions/{NAME}", body, headers)


def model_loads(server: LocalTorchServe) -> int:
    """How many times a worker of `server` has loaded the model so far (the handler logs each load)."""
    log = server.workdir / "logs" / "model_log.log"
    return log.read_text().count(f"spade: loaded {SERIALIZED_NAME}") if log.is_file() else 0


def test_archive_holds_weights_handler_and_batching_config(archive):
    ckpt_path, dist = archive
    with zipfile.ZipFile(dist / f"{NAME}.mar") as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(zf.read("model-config.yaml"))
    assert {SERIALIZED_NAME, HANDLER_NAME, "model-config.yaml"} <= names
    assert manifest["model"]["modelName"] == NAME and manifest["model"]["modelVersion"] == "1.0"
    assert (config["batchSize"], config["maxBatchDelay"]) == (4, 400)
    assert config["handler"] == {"precision": "auto", "max_pixels": 40000, "max_batch": 8}
    props = (dist / "kserve" / "config" / "config.properties").read_text()
    assert "model_store=/mnt/models/model-store" in props
    snapshot = json.loads(next(ln for ln in props.splitlines() if ln.startswith("model_snapshot=")).split("=", 1)[1])
    assert snapshot["models"][NAME]["1.0"]["marName"] == f"{NAME}.mar"
    assert (dist / "kserve" / "model-store" / f"{NAME}.mar").is_file()


def test_package_refuses_to_overwrite_and_names_bad_inputs(archive, tmp_path):
    ckpt_path, dist = archive
    with pytest.raises(Exception, match="already exists; pass --force"):
        package(ckpt_path, name=NAME, version="1.0", out=dist)
    with pytest.raises(Exception, match="model name"):
        package(ckpt_path, name="bad name!", version="1", out=tmp_path)
    with pytest.raises(Exception, match="checkpoint not found"):
        package(tmp_path / "missing.pt", name="x", version="1", out=tmp_path)
    with pytest.raises(Exception, match="batch_size must be at least 1"):
        ServingOptions(batch_size=0)


def test_good_requests_get_pngs_of_the_model_size(server, archive):
    ckpt_path, _ = archive
    label = png(label_map())
    status, headers, body = predict(server, label)
    assert status == 200 and headers.get("Content-Type", "").startswith("image/png")
    image = np.asarray(Image.open(io.BytesIO(body)))
    assert image.shape == (32, 32, 3)
    # the same answer as the service in this process, with the handler's default (auto) precision
    [local] = SynthesisService(ckpt_path, precision="auto").handle([label])
    assert np.abs(np.asarray(Image.open(io.BytesIO(local.body))).astype(int) - image).max() <= 2

    form, ctype = multipart({"label": label, "seed": b"7", "output_size": b"48x40"})
    status, _, body = predict(server, form, ctype)
    assert status == 200 and Image.open(io.BytesIO(body)).size == (48, 40)
    b64 = base64.b64encode(label).decode()
    seeds = [predict(server, json.dumps({"label": b64, "seed": s}).encode(), "application/json")[2] for s in (1, 2)]
    assert seeds[0] != seeds[1]


def test_token_authorization_is_enforced(server):
    """TorchServe answers a missing or a wrong inference key with 400 and its InvalidKeyException; the
    right key (every other test here) gets through."""
    label = png(label_map())
    wrong = {"Content-Type": "image/png", "Authorization": "Bearer not-the-key"}
    for status, _, body in (
        predict(server, label, token=False),
        post(f"{server.inference_url}/predictions/{NAME}", label, wrong),
    ):
        assert status == 400, body
        answer = json.loads(body)
        assert answer["type"] == "InvalidKeyException" and "Token Authorization failed" in answer["message"]
    assert predict(server, label)[0] == 200


def test_bad_requests_get_4xx_json_and_the_worker_survives(server):
    workers_before = server.request("GET", f"/models/{NAME}")[0]["workers"]
    # the server is the module's: other tests (scaling) may have loaded the model in more workers before
    loads_before = wait_for(lambda: model_loads(server), 30, "the worker's model load in model_log.log")
    cases = [
        (b"definitely not a png", "image/png", 400, "not a readable image"),
        (png(np.zeros((8, 8, 3), np.uint8)), "image/png", 400, "mode RGB"),
        (png(np.full((8, 8), 9, np.uint8)), "image/png", 400, "label values 9"),
        (png(np.zeros((300, 300), np.uint8)), "image/png", 413, "the limit is 40000"),
        (json.dumps({"label": "x", "zoom": 1}).encode(), "application/json", 400, "unknown field(s) 'zoom'"),
        (b'{"label": ', "application/json", 400, "does not parse"),
    ]
    form, ctype = multipart({"label": png(label_map()), "instance": png(np.zeros((5, 5), np.uint8))})
    cases.append((form, ctype, 400, "same size"))
    for body, ctype, status, words in cases:
        got, headers, answer = predict(server, body, ctype)
        assert got == status, (words, answer)
        assert headers.get("Content-Type", "").startswith("application/json")
        assert words in json.loads(answer)["error"]
    assert predict(server, png(label_map()))[0] == 200
    workers_after = server.request("GET", f"/models/{NAME}")[0]["workers"]
    assert [w["pid"] for w in workers_after] == [w["pid"] for w in workers_before]
    # the same worker kept its model: not loaded again per request, nor after a bad one
    assert model_loads(server) == loads_before


def test_concurrent_requests_share_one_batched_forward(server):
    labels = [png(label_map(seed=s)) for s in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda body: predict(server, body), labels))
    assert all(status == 200 for status, _, _ in results)
    sizes = [int(headers.get(BATCH_HEADER, "0")) for _, headers, _ in results]
    assert max(sizes) >= 2, sizes  # batch_size 4 with a 400 ms delay: requests were batched
    assert len({body for _, _, body in results}) == 4


def test_scaling_workers_up_and_down(server):
    server.request("PUT", f"/models/{NAME}?min_worker=2&max_worker=2&synchronous=true")
    workers = server.request("GET", f"/models/{NAME}")[0]["workers"]
    assert len(workers) == 2 and all(w["status"] == "READY" for w in workers)
    with ThreadPoolExecutor(2) as pool:
        statuses = list(pool.map(lambda s: predict(server, png(label_map(seed=s)))[0], range(4)))
    assert statuses == [200] * 4
    server.request("PUT", f"/models/{NAME}?min_worker=1&max_worker=1&synchronous=true")
    assert len(server.request("GET", f"/models/{NAME}")[0]["workers"]) == 1


def test_kserve_layout_serves_the_v1_envelope(archive, tmp_path):
    _, dist = archive
    kserve = dist / "kserve"
    with LocalTorchServe(
        kserve / "model-store", base_config=kserve / "config" / "config.properties", token_auth=False, workdir=tmp_path
    ) as ts:
        label = base64.b64encode(png(label_map())).decode()
        body = json.dumps({"instances": [{"label": {"b64": label}, "seed": 1}, {"label": label, "seed": 2}]})
        status, headers, answer = post(
            f"{ts.inference_url}/v1/models/{NAME}:predict", body.encode(), {"Content-Type": "application/json"}
        )
        assert status == 200, answer
        preds = json.loads(answer)["predictions"]
        images = [Image.open(io.BytesIO(base64.b64decode(p))) for p in preds]
        assert [im.size for im in images] == [(32, 32), (32, 32)] and preds[0] != preds[1]
        status, _, answer = post(
            f"{ts.inference_url}/v1/models/{NAME}:predict", b'{"instances": [{"lable": "x"}]}',
            {"Content-Type": "application/json"},
        )  # fmt: skip
        assert status == 400 and "instances[0]: unknown field(s) 'lable'" in json.loads(answer)["error"]


def test_studio_talks_to_the_real_torchserve(server):
    """`spade studio --endpoint`: the model description and images come from TorchServe, with its token."""
    from spade.serve.studio import EndpointBackend, make_server

    backend = EndpointBackend(f"{server.inference_url}/predictions/{NAME}", server.inference_key)
    studio = make_server(backend, "127.0.0.1", 0)
    thread = threading.Thread(target=studio.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(f"{studio.url}api/info", timeout=30) as resp:
            info = json.loads(resp.read())
        assert (info["width"], info["height"], info["label_nc"], info["multimodal"]) == (32, 32, 8, True)
        values = base64.b64encode(label_map(32, 32).tobytes()).decode()
        images = []
        for seed in (1, 2):
            body = json.dumps({"label_values": values, "width": 32, "height": 32, "seed": seed}).encode()
            status, headers, data = post(f"{studio.url}api/synthesize", body, {"Content-Type": "application/json"})
            assert status == 200 and Image.open(io.BytesIO(data)).size == (32, 32)
            images.append(data)
        assert images[0] != images[1]
        body = json.dumps({"label_values": base64.b64encode(bytes([9] * 1024)).decode(), "width": 32, "height": 32})
        status, _, data = post(f"{studio.url}api/synthesize", body.encode(), {"Content-Type": "application/json"})
        assert status == 400 and "label values 9" in json.loads(data)["error"]  # TorchServe's 4xx, passed through
    finally:
        studio.shutdown()
        studio.server_close()


def test_register_promotes_into_the_real_torchserve(server, archive, tmp_path):
    """`spade register --torchserve-url`: every version is registered there; only a champion becomes default."""
    from spade.serve.register import register

    ckpt_path, dist = archive
    options = ServingOptions(batch_size=1, max_batch_delay_ms=0)
    versions = {}
    for version in ("2.0", "3.0"):
        out = tmp_path / version
        versions[version] = package(ckpt_path, name=NAME, version=version, out=out, options=options).mar
    common = dict(
        store=str(dist),  # the TorchServe model store
        tracking_uri=f"sqlite:///{tmp_path / 'registry.db'}",
        torchserve_url=server.management_url,
        torchserve_token=server.management_key,
    )
    first = register(mar=versions["2.0"], metrics={"fid": 40.0, "mIoU": 0.30}, **common)
    assert first["promoted"] is True
    worse = register(mar=versions["3.0"], metrics={"fid": 60.0, "mIoU": 0.20}, **common)
    assert worse["promoted"] is False

    listed = server.request("GET", f"/models/{NAME}/all")
    by_version = {m["modelVersion"]: m for m in listed}
    assert {"1.0", "2.0", "3.0"} <= set(by_version)
    default = server.request("GET", f"/models/{NAME}")[0]
    assert default["modelVersion"] == "2.0"  # the champion, not the newer but worse candidate
    status, _, body = predict(server, png(label_map()))
    assert status == 200 and Image.open(io.BytesIO(body)).size == (32, 32)
    status, _, body = post(
        f"{server.inference_url}/predictions/{NAME}/3.0", png(label_map()),
        {"Content-Type": "image/png", **server.headers()},
    )  # fmt: skip
    assert status == 200  # the candidate answers by version, for a trial
