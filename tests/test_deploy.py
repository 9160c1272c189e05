"""`spade deploy` against a real TorchServe started from the shipped configuration (the KServe layout's
config.properties that `spade package` writes, only its addresses moved to free 127.0.0.1 ports): a new
version goes live while clients keep calling the endpoint, and none of their requests fails."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_helpers import label_map, make_checkpoint, png
from spade.errors import SpadeError
from spade.serve.deploy import deploy_to_torchserve
from spade.serve.local_torchserve import LocalTorchServe
from spade.serve.package import HANDLER_NAME, ServingOptions, package
from spade.serve.torchserve_api import TorchServe

NAME = "tiny"
FLOAT32 = ServingOptions(precision="float32", batch_size=4, max_batch_delay_ms=20)


def spade_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spade", *args], capture_output=True, text=True, timeout=600, **kw)


def predict(url: str, body: bytes, version: str | None = None) -> tuple[int, bytes]:
    path = f"/predictions/{NAME}" + (f"/{version}" if version else "")
    req = urllib.request.Request(url + path, data=body, method="POST", headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError as err:  # a dropped connection counts as a failed request too
        return -1, str(err).encode()


def pixels(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Checkpoints 1 and 2 (different weights), their archives (versions 1 and 2, float32 serving), a
    broken archive (version 3, whose handler cannot start), and each model's image of one label map made
    by `spade synthesize` (the exact path)."""
    root = tmp_path_factory.mktemp("deploy")
    label = root / "label.png"
    label.write_bytes(png(label_map(32, 32, seed=3)))
    out = {"root": root, "label": label}
    for version, seed in (("1", 0), ("2", 1)):
        ckpt = make_checkpoint(instance=False)
        if seed:
            import torch

            torch.manual_seed(seed)
            ckpt.generator = {
                k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ckpt.generator.items()
            }
        ckpt.save(root / f"model{version}.pt")
        package(root / f"model{version}.pt", name=NAME, version=version, out=root / f"dist{version}", options=FLOAT32)
        out[f"mar{version}"] = root / f"dist{version}" / f"{NAME}.mar"
        image = root / f"expected{version}.png"
        proc = spade_cli("synthesize", "--checkpoint", str(root / f"model{version}.pt"), "--label", str(label),
                         "--output", str(image), "--precision", "float32")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        out[f"expected{version}"] = pixels(image.read_bytes())
    assert np.abs(out["expected1"] - out["expected2"]).max() > 20  # the two versions are told apart by their images
    broken = root / "broken.mar"
    with zipfile.ZipFile(out["mar2"]) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["modelVersion"] = "3"
                data = json.dumps(manifest).encode()
            elif item.filename == HANDLER_NAME:
                data = b"raise RuntimeError('this handler is broken on purpose')\n"
            dst.writestr(item, data)
    out["broken"] = broken
    return out


@pytest.fixture
def server(world, tmp_path):
    """TorchServe from the shipped KServe configuration, serving version 1 (its model_snapshot loads it)."""
    kserve = world["mar1"].parent / "kserve"
    store = tmp_path / "model-store"
    store.mkdir()
    (store / f"{NAME}.mar").write_bytes((kserve / "model-store" / f"{NAME}.mar").read_bytes())
    with LocalTorchServe(
        store, base_config=kserve / "config" / "config.properties", token_auth=None, workdir=tmp_path / "ts"
    ) as ts:
        yield ts


def test_the_shipped_configuration_is_usable_and_keeps_management_on_loopback(world, server):
    props = (world["mar1"].parent / "kserve" / "config" / "config.properties").read_text()
    settings = dict(line.split("=", 1) for line in props.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["management_address"].startswith("http://127.0.0.1:")  # never 0.0.0.0 without a key
    assert settings["enable_model_api"] == "true"  # what deploy needs
    assert settings["inference_address"].startswith("http://0.0.0.0:")
    # the server runs that configuration (addresses aside): the model API answers, version 1 is default
    ts = TorchServe(server.management_url)
    assert ts.default_version(NAME) == "1" and ts.versions(NAME) == ["1"]


def test_deploy_swaps_versions_under_load_with_no_failed_request(world, server, capsys):
    body = world["label"].read_bytes()
    results: list[tuple[float, int, bytes]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, answer = predict(server.inference_url, body)
            results.append((time.monotonic(), status, answer))

    status, answer = predict(server.inference_url, body)
    assert status == 200 and np.abs(pixels(answer) - world["expected1"]).max() <= 1
    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        from spade.cli import main

        code = main(["deploy", "--mar", str(world["mar2"]), "--torchserve-url", server.management_url,
                     "--model-store", str(server.model_store), "--inference-url", server.inference_url,
                     "--drain", "2"])  # fmt: skip
        swapped = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert (result["version"], result["previous"], result["unregistered"]) == ("2", "1", ["1"])

    failed = [(s, a[:200]) for _, s, a in results if s != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed during the swap: {failed[:3]}"
    assert len(results) >= 20
    served = []
    for _, _, answer in results:
        image = pixels(answer)
        if np.abs(image - world["expected1"]).max() <= 1:
            served.append(1)
        else:  # requests batched together may differ by a rounding step from the single-image path
            assert np.abs(image - world["expected2"]).max() <= 1, "an answer is neither version's image"
            served.append(2)
    assert 1 in served and 2 in served  # the load spanned the swap
    late = [served[i] for i, (t, _, _) in enumerate(results) if t > swapped + 0.5]
    assert late and set(late) == {2}

    ts = TorchServe(server.management_url)
    assert ts.default_version(NAME) == "2" and ts.versions(NAME) == ["2"]
    status, answer = predict(server.inference_url, body)
    assert status == 200 and np.array_equal(pixels(answer), world["expected2"])  # == spade synthesize of model 2

    # the same version again: nothing to do
    again = deploy_to_torchserve(world["mar2"], ts, model_store=server.model_store, say=lambda _: None)
    assert again.get("already_live") and ts.versions(NAME) == ["2"]


def test_a_broken_archive_leaves_the_serving_version_alone(world, server):
    ts = TorchServe(server.management_url, timeout=120)
    before = sorted(p.name for p in server.model_store.iterdir())
    with pytest.raises(SpadeError) as err:
        deploy_to_torchserve(
            world["broken"], ts, model_store=server.model_store, ready_timeout=60, drain=0, say=lambda _: None
        )
    message = str(err.value)
    assert message.startswith(f"deploy of {world['broken']} failed, version 1 stays the default")
    assert ts.default_version(NAME) == "1" and ts.versions(NAME) == ["1"]
    assert sorted(p.name for p in server.model_store.iterdir()) == before  # the copied archive is gone again
    status, answer = predict(server.inference_url, world["label"].read_bytes())
    assert status == 200 and np.abs(pixels(answer) - world["expected1"]).max() <= 1


def test_deploy_resolves_the_champion_from_the_mlflow_registry(world, server, tmp_path, capsys):
    """`spade register` promotes version 2 to champion; `spade deploy --model tiny --alias champion` deploys
    the archive the registry recorded (its sha256 checked), as the pipeline and a person both would."""
    from spade.cli import main
    from spade.config import RegisterConfig
    from spade.serve.register import register

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    decision = register(
        mar=world["mar2"], metrics={"fid": 30.0, "mIoU": 0.5}, tracking_uri=uri, experiment="deploy-test",
        config=RegisterConfig(store=str(tmp_path / "registry-store"), model_name=NAME),
    )  # fmt: skip
    assert decision["promoted"]
    capsys.readouterr()
    args = ["deploy", "--model", NAME, "--alias", "champion", "--tracking-uri", uri,
            "--torchserve-url", server.management_url, "--model-store", str(server.model_store)]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["registry"]["version"] == str(decision["version"]) and result["version"] == "2"
    assert TorchServe(server.management_url).default_version(NAME) == "2"

    # a stored archive that changed after registration is refused before anything is touched
    stored = Path(decision["archive"]["uri"])
    stored.write_bytes(stored.read_bytes() + b"tampered")
    assert main(args) == 1
    assert "does not have the sha256 recorded" in capsys.readouterr().err
    assert main(["deploy", "--model", NAME, "--alias", "nobody", "--tracking-uri", uri,
                 "--torchserve-url", server.management_url]) == 1  # fmt: skip
    assert "has no version 'nobody'" in capsys.readouterr().err


def test_deploy_needs_a_way_for_the_server_to_load_the_archive(world, server):
    with pytest.raises(SpadeError, match="pass --model-store .* or --archive-url"):
        deploy_to_torchserve(world["mar2"], TorchServe(server.management_url), say=lambda _: None)
    assert TorchServe(server.management_url).versions(NAME) == ["1"]


def test_another_archive_under_a_version_the_server_has_is_refused(world, server, tmp_path):
    """Versions name archives: model 2 packaged as version 1 again must not pass for the live version 1."""
    package(world["root"] / "model2.pt", name=NAME, version="1", out=tmp_path / "dist", options=FLOAT32)
    ts = TorchServe(server.management_url)
    with pytest.raises(SpadeError, match=r"already has version 1 of tiny, loaded from tiny.mar, not from this archive"):
        deploy_to_torchserve(tmp_path / "dist" / f"{NAME}.mar", ts, model_store=server.model_store, say=lambda _: None)
    # the very archive that is live is recognised by its content, whatever its file name
    again = deploy_to_torchserve(world["mar1"], ts, model_store=server.model_store, say=lambda _: None)
    assert again.get("already_live") and ts.default_version(NAME) == "1"


def test_stored_files_are_readable_by_the_server_s_own_user(tmp_path, monkeypatch):
    """Store.put writes through mkstemp (mode 0600); a TorchServe running as another user (the image's, in a
    container) could not read the archive it was told to load. The umask decides, as for any written file."""
    import os
    import stat

    from spade.storage import Store

    source = tmp_path / "a.mar"
    source.write_bytes(b"archive")
    old = os.umask(0o022)
    try:
        stored = Path(Store(tmp_path / "store").put(source, "a.mar"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(stored.stat().st_mode) == 0o644 and stored.read_bytes() == b"archive"
