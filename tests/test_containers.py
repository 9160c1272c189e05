"""The container path for real: `make image` builds the project image here, the demo pipeline runs with every
task in a container of it against real services over the network, and the image serves what it registered.

Needs a Docker engine (make test starts one: scripts/docker-engine.sh); when none answers, these tests fail
with the reason, they are not skipped. The image build is the Makefile's (scripts/build-image.sh): a cached
build after a source edit takes seconds, a cold one a few minutes.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from spade.serve.local_torchserve import LocalTorchServe

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "spade:dev"
APP_UID = 10001  # the Dockerfile's APP_UID
TASKS = {"fetch-dataset", "pseudolabel", "train", "evaluate", "package-and-register"}


def torch_version(image: str) -> str:
    return docker("run", "--rm", image, "python", "-c", "import torch; print(torch.__version__)").stdout.strip()


def docker(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    engine = subprocess.run(["bash", "scripts/docker-engine.sh"], cwd=ROOT, capture_output=True, text=True)
    assert engine.returncode == 0, f"no Docker engine: {engine.stdout}{engine.stderr}"
    t0 = time.monotonic()
    build = subprocess.run(["make", "image"], cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    print(f"make image: {time.monotonic() - t0:.0f} s; {build.stdout.strip().splitlines()[-1]}")
    return IMAGE


def test_make_image_builds_the_project_image_with_its_tools_as_a_non_root_user(image):
    script = (
        "import hashlib, importlib.metadata as m, pathlib, spade.cli; "
        "print(hashlib.sha256(pathlib.Path(spade.cli.__file__).read_bytes()).hexdigest()); "
        "print(m.version('kfp'), m.version('torchserve'), m.version('mlflow'))"
    )
    out = docker("run", "--rm", image, "sh", "-c", f'id -u && java -version 2>&1 | head -n 1 && python -c "{script}"')
    assert out.returncode == 0, out.stderr
    uid, java, digest, versions = out.stdout.strip().splitlines()
    assert uid == str(APP_UID)
    assert 'version "17' in java
    # the image holds this checkout's code, installed as a package (not the copy in /app)
    assert digest == hashlib.sha256((ROOT / "spade" / "cli.py").read_bytes()).hexdigest()
    assert len(versions.split()) == 3
    for command in (["spade", "--help"], ["torchserve", "--help"], ["mlflow", "--version"]):
        ran = docker("run", "--rm", image, *command)
        assert ran.returncode == 0, (command, ran.stderr)
    assert docker("run", "--rm", image).stdout.startswith("usage: spade ")  # CMD: spade --help


@pytest.fixture(scope="module")
def containerized_demo(image):
    """`spade pipeline demo --runner docker` in a folder of its own, with the container starts it caused."""
    # the postgres user (PostgreSQL refuses root) must reach its data folder: not under pytest's 0700 tmp
    work = Path(tempfile.mkdtemp(prefix="spade-containers-"))
    work.chmod(0o755)
    events = subprocess.Popen(
        ["docker", "events", "--filter", "type=container", "--filter", "event=start", "--format", "{{json .}}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1)
    cmd = [sys.executable, "-m", "spade.cli", "pipeline", "demo", "--runner", "docker", "--image", image]
    cmd += ["--params", str(ROOT / "params.yaml"), "--work", "demo", "--pipeline-root", "pipeline"]
    cmd += ["--set", "train.iterations=30", "--set", "segmenter.iterations=60", "--set", "package.precision=float32"]
    cmd += ["--set", "tracking.experiment=containers"]
    t0 = time.monotonic()
    run = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=1500)
    elapsed = time.monotonic() - t0
    time.sleep(1)
    events.terminate()
    started = [json.loads(line) for line in events.communicate(timeout=30)[0].splitlines() if line.strip()]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-4000:]
    print(f"containerized demo: {elapsed:.0f} s")
    yield work, run.stdout, [e for e in started if e.get("from") == image]
    shutil.rmtree(work, ignore_errors=True)


def test_every_pipeline_task_runs_in_a_container_of_the_image_as_its_user(containerized_demo):
    work, log, started = containerized_demo
    names = [e["Actor"]["Attributes"]["name"] for e in started]
    mlflow = [n for n in names if n.startswith("spade-mlflow-")]
    assert len(mlflow) == 1, names  # the tracking server, from the same image
    # one container per task (the unlabeled branch: no use-labeled-dataset)
    assert len(names) - len(mlflow) == len(TASKS), names
    [run] = list((work / "pipeline").glob("spade-training-*"))
    for task in TASKS:
        output = run / task / "executor_output.json"
        assert output.is_file(), task
        assert output.stat().st_uid == APP_UID, (task, output.stat().st_uid)  # written inside, by the image's user
    assert "each task a container of spade:dev" in log


def test_the_run_is_tracked_and_registered_through_the_services(containerized_demo, image):
    """Started again on the same folder, the services still hold the run, its artifacts and the version."""
    from mlflow import MlflowClient

    from pipelines.services import local_services

    work, _, _ = containerized_demo
    with local_services(work / "demo" / "services", image=image, say=lambda _: None) as services:
        client = MlflowClient(tracking_uri=services.mlflow_url, registry_uri=services.mlflow_url)
        [experiment] = [e for e in client.search_experiments() if e.name == "containers"]
        [mlrun] = client.search_runs([experiment.experiment_id])
        history = client.get_metric_history(mlrun.info.run_id, "lr_G")
        assert [m.step for m in history] == [10, 20, 30]  # train.log_every 10, 30 iterations
        name = yaml.safe_load((ROOT / "params.yaml").read_text())["package"]["name"]  # register.model_name is ""
        [version] = client.search_model_versions(f"name='{name}'")
        archive_uri = version.tags.get("archive_uri") or version.source
        assert archive_uri.startswith(f"s3://spade-models/{name}/"), archive_uri
        s3 = services.s3_client()
        bucket, _, key = archive_uri[len("s3://") :].partition("/")
        assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0
        # MLflow's artifacts went to the object store through the server
        assert s3.list_objects_v2(Bucket="mlflow").get("KeyCount", 0) > 0
        store = work / "served"
        store.mkdir()
        s3.download_file(bucket, key, str(store / Path(key).name))
    assert (work / "demo" / "services" / "s3" / bucket / key).is_file()  # kept on disk


def test_the_image_serves_the_registered_archive_as_the_host_synthesizes(containerized_demo, image):
    work, _, _ = containerized_demo
    [mar] = list((work / "served").glob("*.mar"))
    [checkpoint] = list((work / "pipeline").glob("spade-training-*/train/**/final.pt"))
    label_path = sorted((work / "data" / "builtin" / "val_label").glob("*.png"))[0]
    host = work / "host.png"
    synth = subprocess.run(
        [sys.executable, "-m", "spade.cli", "synthesize", "--checkpoint", str(checkpoint), "--label", str(label_path)]
        + ["--precision", "float32", "--output", str(host)],
        capture_output=True,
        text=True,
    )
    assert synth.returncode == 0, synth.stderr
    workdir = work / "torchserve"
    workdir.mkdir()
    with LocalTorchServe(work / "served", models=[f"spade={mar.name}"], image=image, workdir=workdir) as ts:
        import urllib.error
        import urllib.request

        def post(body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
            req = urllib.request.Request(f"{ts.inference_url}/predictions/spade", data=body, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as err:
                return err.code, err.read()

        status, body = post(label_path.read_bytes(), {"Content-Type": "image/png", **ts.headers()})
        assert status == 200, body[:500]
        served = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int)
        expected = np.asarray(Image.open(host).convert("RGB")).astype(int)
        assert served.shape == expected.shape
        if torch_version(image) == torch.__version__:  # the same float32 kernels: the same bytes
            assert np.array_equal(served, expected)
        else:  # another torch build sums in another order: float32 rounding, a step of uint8 at most in a few
            diff = np.abs(served - expected)
            assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
        # token authorization is on: no key, no image
        status, body = post(label_path.read_bytes(), {"Content-Type": "image/png"})
        assert status == 400 and json.loads(body)["type"] == "InvalidKeyException"
        status, body = post(b"not a png", {"Content-Type": "image/png", **ts.headers()})
        assert 400 <= status < 500, body[:300]
    assert docker("ps", "-q", "--filter", f"name={ts.container}").stdout.strip() == ""  # stopped and removed


def test_the_docker_runner_names_a_missing_image_and_how_to_build_it(tmp_path):
    cmd = [sys.executable, "-m", "spade.cli", "pipeline", "demo", "--runner", "docker", "--image", "spade:not-built"]
    cmd += ["--params", str(ROOT / "params.yaml"), "--set", "segmenter.iterations=5"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    assert "image spade:not-built" in run.stderr and "make image" in run.stderr, run.stderr[-2000:]
