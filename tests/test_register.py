"""`spade register` against a real `mlflow server` (SQLite) on 127.0.0.1, a local folder and a moto S3 store,
and a fake TorchServe management API: registration, lineage, the promotion gate and its record."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.parse
import zipfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch

from http_helpers import FakeServer, reply
from spade.config import RegisterConfig
from spade.errors import SpadeError
from spade.serve import register as reg
from train_helpers import MlflowServer, free_port, moto_s3

BUCKET = "spade-models"
HANDLER = "from spade.serve.handler import SpadeHandler\n\n\nclass Handler(SpadeHandler):\n    pass\n"


# --- services, started once for the module --------------------------------------------------------


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """A moto S3 server (its environment and a client) and a real `mlflow server`."""
    root = tmp_path_factory.mktemp("register-services")
    with moto_s3(root, BUCKET) as (s3_env, s3), MlflowServer(root) as server:
        yield {"mlflow": server.uri, "s3": s3_env, "s3_client": s3}


@pytest.fixture
def mlflow_uri(services, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv(reg.TOKEN_ENV, raising=False)
    return services["mlflow"]


@pytest.fixture
def client(mlflow_uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_uri)


# --- archives -----------------------------------------------------------------------------------


def make_mar(folder: Path, name: str, version: str = "1.0", **meta: object) -> Path:
    """A real .mar from torch-model-archiver, around a small project-checkpoint dict whose meta is `meta`."""
    work = folder / f"{name}-{version}-src"
    work.mkdir(parents=True)
    ckpt = {
        "format": "spade-checkpoint",
        "version": 1,
        "config": {"preset": "custom"},
        "generator": {"weight": torch.randn(4)},
        "meta": {"source": "training", **meta},
    }
    torch.save(ckpt, work / "model.pt")
    (work / "handler.py").write_text(HANDLER)
    out = folder / f"{name}-{version}-mar"
    out.mkdir()
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    subprocess.run(
        [
            str(archiver),
            "--model-name",
            name,
            "--version",
            version,
            "--serialized-file",
            str(work / "model.pt"),
            "--handler",
            str(work / "handler.py"),
            "--export-path",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return out / f"{name}.mar"


def training_run(client, experiment: str = "spade-train") -> str:  # noqa: ANN001
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run_id = client.create_run(exp_id).info.run_id
    client.set_terminated(run_id)
    return run_id


def versions_of(client, name: str) -> list[str]:  # noqa: ANN001
    return sorted(mv.version for mv in client.search_model_versions(f"name='{name}'"))


def alias(client, name: str, which: str) -> str:  # noqa: ANN001
    return client.get_model_version_by_alias(name, which).version


class Registrar:
    """register() with the test's server, store and tolerances; a new archive per call."""

    def __init__(self, tmp: Path, uri: str, name: str, store: str | None = None, **defaults: object) -> None:
        self.tmp, self.uri, self.name = tmp, uri, name
        self.store = store or str(tmp / "store")
        self.defaults = defaults
        self.count = 0

    def __call__(self, metrics: dict, meta: dict | None = None, **kwargs: object) -> dict:
        self.count += 1
        mar = make_mar(self.tmp, self.name, f"{self.count}.0", **(meta or {}))
        args = {
            "mar": mar,
            "metrics": metrics,
            "store": self.store,
            "tracking_uri": self.uri,
            "fid_tolerance": 0.5,
            "miou_tolerance": 0.005,
            **self.defaults,
            **kwargs,
        }
        return reg.register(**args)


# --- registration, lineage, the record ----------------------------------------------------------


def test_first_version_becomes_champion_with_lineage_metrics_and_record(tmp_path, client, mlflow_uri):
    run_id = training_run(client)
    meta = {
        "git_commit": "a1b2c3d",
        "dataset_fingerprint": "fp-123",
        "iteration": 600,
        "mlflow_run_id": run_id,
        "mlflow_tracking_uri": mlflow_uri,
    }
    mar = make_mar(tmp_path, "spade-first", "1.0", **meta)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"mIoU": 0.42, "accuracy": 0.8, "fid": 55.5, "per_class_iou": {"sky": 0.9}}))
    out = tmp_path / "out" / "decision.json"

    decision = reg.register(
        mar=mar, metrics=metrics, store=str(tmp_path / "store"), tracking_uri=mlflow_uri, decision_out=out
    )

    assert decision["promoted"] and decision["decision"] == "promoted" and decision["version"] == "1"
    assert decision["previous_champion"] is None and "first version" in decision["reason"]
    assert json.loads(out.read_text()) == decision
    assert alias(client, "spade-first", "champion") == "1" and alias(client, "spade-first", "candidate") == "1"
    # the archive is in the store under a content-addressed name, and registered from the training run's copy
    stored = Path(decision["archive"]["uri"])
    assert stored.parent == (tmp_path / "store").resolve() and stored.read_bytes() == mar.read_bytes()
    assert decision["archive"]["sha256"][:12] in stored.name
    mv = client.get_model_version("spade-first", "1")
    assert mv.run_id == run_id
    assert mv.source == f"runs:/{run_id}/model-archive/{stored.name}"
    assert [a.path for a in client.list_artifacts(run_id, "model-archive")] == [f"model-archive/{stored.name}"]
    # lineage, metrics and the decision as tags
    tags = mv.tags
    assert tags["git_commit"] == "a1b2c3d" and tags["dataset_fingerprint"] == "fp-123"
    assert tags["training_run_id"] == run_id and tags["iteration"] == "600"
    assert tags["archive_uri"] == str(stored) and tags["archive_sha256"] == decision["archive"]["sha256"]
    assert tags["mar_model_name"] == "spade-first" and tags["mar_version"] == "1.0"
    assert float(tags["metric.fid"]) == 55.5 and float(tags["metric.mIoU"]) == 0.42
    assert float(tags["metric.accuracy"]) == 0.8
    assert tags["decision"] == "promoted" and tags["decision.champion_before"] == "none"
    assert float(tags["decision.fid_tolerance"]) == 0.5 and float(tags["decision.miou_tolerance"]) == 0.005
    assert "promoted" in mv.description and "fid 55.5" in mv.description
    # the numbers and the outcome on the training run, comparable with other runs
    run = client.get_run(run_id)
    assert run.data.metrics["eval_fid"] == 55.5 and run.data.metrics["eval_mIoU"] == 0.42
    assert (
        run.data.tags["spade.registered_version"] == "1" and run.data.tags["spade.registration_decision"] == "promoted"
    )
    assert [a.path for a in client.list_artifacts(run_id, "registration")] == ["registration/decision-v1.json"]
    copy = client.download_artifacts(run_id, "registration/decision-v1.json", str(tmp_path))
    assert json.loads(Path(copy).read_text()) == decision
    assert decision["lineage"] == {
        "git_commit": "a1b2c3d",
        "dataset_fingerprint": "fp-123",
        "iteration": 600,
        "source": "training",
        "mlflow_tracking_uri": mlflow_uri,
        "training_run_id": run_id,
        "preset": "custom",
    }


def test_gate_keeps_worse_candidates_promotes_better_ones_and_passes_at_the_boundary(tmp_path, client, mlflow_uri):
    name = "spade-gate"
    register = Registrar(tmp_path, mlflow_uri, name)

    first = register({"fid": 40.0, "mIoU": 0.5})
    assert first["promoted"]

    worse_fid = register({"fid": 40.6, "mIoU": 0.55})  # FID beyond 40 + 0.5
    assert not worse_fid["promoted"] and worse_fid["decision"] == "candidate"
    assert alias(client, name, "champion") == "1" and alias(client, name, "candidate") == "2"
    assert worse_fid["champion"] == "1" and worse_fid["previous_champion"] == {"version": "1", "fid": 40.0, "mIoU": 0.5}
    assert "FID 40.6 > 40.5" in worse_fid["reason"]
    tags = client.get_model_version(name, "2").tags
    assert tags["decision"] == "candidate" and tags["decision.champion_before"] == "1"
    assert float(tags["decision.champion_fid"]) == 40.0 and float(tags["decision.champion_mIoU"]) == 0.5
    assert "FID 40.6 > 40.5" in tags["decision.reason"]

    worse_miou = register({"fid": 30.0, "mIoU": 0.4949})  # mIoU below 0.5 - 0.005
    assert not worse_miou["promoted"] and alias(client, name, "champion") == "1"
    assert [c["passed"] for c in worse_miou["checks"]] == [True, False]

    boundary = register({"fid": 40.5, "mIoU": 0.495})  # exactly at both limits: passes
    assert boundary["promoted"] and boundary["version"] == "4"
    assert alias(client, name, "champion") == "4" and alias(client, name, "candidate") == "4"
    assert {c["metric"]: c["limit"] for c in boundary["checks"]} == pytest.approx({"fid": 40.5, "mIoU": 0.495})

    better = register({"fid": 20.0, "mIoU": 0.6})
    assert better["promoted"] and better["previous_champion"]["version"] == "4"
    assert alias(client, name, "champion") == "5"

    assert versions_of(client, name) == ["1", "2", "3", "4", "5"]


def test_a_candidate_lacking_a_metric_the_champion_has_is_not_promoted_and_force_overrides(
    tmp_path, client, mlflow_uri
):
    name = "spade-partial"
    register = Registrar(tmp_path, mlflow_uri, name)
    register({"fid": 30.0, "mIoU": 0.5})

    fid_only = register({"fid": 29.0, "mIoU": None})  # mIoU null (no pixel scored): better FID is not enough
    assert not fid_only["promoted"] and alias(client, name, "champion") == "1"
    assert "the candidate has no mIoU, which champion v1 has (0.5)" in fid_only["reason"]
    assert "the candidate has no mIoU" in client.get_model_version(name, "2").tags["decision.reason"]

    with pytest.raises(SpadeError, match=r"neither 'fid' nor 'mIoU'.*--force"):
        register({"accuracy": 0.9})
    assert versions_of(client, name) == ["1", "2"]  # refused before anything was written

    forced = register({"accuracy": 0.9}, force=True)
    assert forced["promoted"] and forced["forced"] and forced["reason"].startswith("forced")
    assert alias(client, name, "champion") == "3"
    assert client.get_model_version(name, "3").tags["decision.forced"] == "true"

    # the champion now has no FID or mIoU: nothing to compare, so a candidate is not promoted
    after = register({"fid": 10.0, "mIoU": 0.9})
    assert not after["promoted"] and "nothing to compare with champion v3" in after["reason"]
    assert alias(client, name, "champion") == "3"

    # a metric only the candidate has is noted, not held against it
    name = "spade-fid-later"
    register = Registrar(tmp_path / "b", mlflow_uri, name)
    register({"fid": None, "mIoU": 0.5})
    more = register({"fid": 25.0, "mIoU": 0.51})
    assert more["promoted"] and more["skipped"] == ["fid not compared (missing for champion v1)"]


def scored(
    fid: float, miou: float, fingerprint: str = "a" * 64, segmenter: str = "small", weights: str = "sha256:1"
) -> dict:
    """metrics.json as `spade evaluate` writes it: the numbers and what they were measured on."""
    data = {"fingerprint": fingerprint, "split": "val"}
    return {"fid": fid, "mIoU": miou, "segmenter": segmenter, "segmenter_weights": weights, "data": data}


def test_the_gate_compares_only_numbers_measured_on_the_same_data_with_the_same_segmenter(tmp_path, client, mlflow_uri):
    name = "spade-protocol"
    register = Registrar(tmp_path, mlflow_uri, name)
    first = register(scored(30.0, 0.5))
    tags = client.get_model_version(name, "1").tags
    assert tags["eval.data_fingerprint"] == "a" * 64 and tags["eval.segmenter"] == "small"
    assert first["protocol"] == {
        "data_fingerprint": "a" * 64, "segmenter": "small", "segmenter_weights": "sha256:1", "split": "val"
    }  # fmt: skip

    # far better numbers, but on other data (an easier split, a different sample): not comparable
    other_data = register(scored(5.0, 0.9, fingerprint="b" * 64))
    assert not other_data["promoted"] and alias(client, name, "champion") == "1"
    assert "scored on other data than champion v1 (bbbbbbbbbbbb vs aaaaaaaaaaaa)" in other_data["reason"]
    other_segmenter = register(scored(5.0, 0.9, segmenter="deeplabv2-cocostuff"))
    assert not other_segmenter["promoted"]
    assert "scored on other segmenter than champion v1 (deeplabv2-cocostuff vs small)" in other_segmenter["reason"]

    refitted = register(scored(5.0, 0.9, weights="sha256:2"))  # the same segmenter's name, other weights
    assert not refitted["promoted"]
    assert "scored on other segmenter weights than champion v1 (sha256:2 vs sha256:1)" in refitted["reason"]

    same = register(scored(29.0, 0.51))
    assert same["promoted"] and alias(client, name, "champion") == "5"
    unknown = register({"fid": 5.0, "mIoU": 0.9})  # numbers with no record of what they were measured on
    assert not unknown["promoted"] and alias(client, name, "champion") == "5"
    assert "the data the candidate was scored on is not recorded, while that of champion v5 is" in unknown["reason"]

    # a champion registered before the protocol was recorded: its numbers alone, and the decision says so
    name = "spade-old-champion"
    register = Registrar(tmp_path / "old", mlflow_uri, name)
    register({"fid": 30.0, "mIoU": 0.5})
    newer = register(scored(29.0, 0.5))
    assert newer["promoted"]
    assert "the data champion v1 was scored on is not recorded: compared on the numbers alone" in newer["skipped"]


# --- stores -------------------------------------------------------------------------------------


def test_s3_store_registers_the_object_uri_and_a_registration_run(tmp_path, client, services, monkeypatch):
    for key, value in services["s3"].items():
        monkeypatch.setenv(key, value)
    s3 = services["s3_client"]
    mar = make_mar(tmp_path, "spade-s3", "2.1", git_commit="feedbee", dataset_fingerprint="fp-s3")
    s3.upload_file(str(mar), BUCKET, "incoming/spade-s3.mar")  # the archive itself may come from S3 too

    decision = reg.register(
        mar=f"s3://{BUCKET}/incoming/spade-s3.mar",
        metrics={"fid": 12.0, "mIoU": 0.3},
        store=f"s3://{BUCKET}/models/spade",
        tracking_uri=services["mlflow"],
        experiment="spade-registrations",
    )

    uri = decision["archive"]["uri"]
    assert uri == f"s3://{BUCKET}/models/spade/{decision['archive']['file']}"
    assert decision["archive"]["file"].startswith("spade-s3-2.1-")
    body = s3.get_object(Bucket=BUCKET, Key=f"models/spade/{decision['archive']['file']}")["Body"].read()
    assert body == mar.read_bytes()
    mv = client.get_model_version("spade-s3", decision["version"])
    assert mv.source == uri and mv.tags["archive_uri"] == uri
    assert mv.tags["git_commit"] == "feedbee" and "training_run_id" not in mv.tags
    # no training run in the archive: the version is linked to a registration run holding the metrics
    run = client.get_run(mv.run_id)
    assert decision["mlflow"] == {"tracking_uri": services["mlflow"], "run_id": mv.run_id, "registration_run": True}
    assert run.data.tags["spade.stage"] == "registration" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "spade-registrations"
    assert run.data.metrics == {"eval_fid": 12.0, "eval_mIoU": 0.3}


# --- TorchServe ---------------------------------------------------------------------------------


class FakeTorchServe(FakeServer):
    """A management API on 127.0.0.1 that records requests; `answers` queues (status, body) replies."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.answers: list[tuple[int, dict]] = []

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        if h.command not in ("POST", "PUT"):
            reply(h, 501, {"code": 501, "message": f"unsupported method {h.command}"})
            return
        parsed = urllib.parse.urlsplit(h.path)
        self.requests.append(
            {
                "method": h.command,
                "path": parsed.path,
                "query": dict(urllib.parse.parse_qsl(parsed.query)),
                "auth": h.headers.get("Authorization"),
            }
        )
        status, body = self.answers.pop(0) if self.answers else (200, {"status": "ok"})
        reply(h, status, body)

    @property
    def url(self) -> str:
        return self.base

    def calls(self) -> list[tuple[str, str]]:
        done = [(r["method"], r["path"]) for r in self.requests]
        self.requests.clear()
        return done

    def stop(self) -> None:
        """Stop serving (a test may stop it early: later calls find nothing listening)."""
        if self.base:
            self.__exit__(None, None, None)
            self.base = ""


@pytest.fixture
def torchserve():
    fake = FakeTorchServe().__enter__()
    yield fake
    fake.stop()


def test_torchserve_registers_every_version_and_makes_only_promoted_ones_default(
    tmp_path, client, mlflow_uri, torchserve, monkeypatch
):
    monkeypatch.setenv(reg.TOKEN_ENV, "secret-key")
    name = "spade-ts"
    register = Registrar(tmp_path, mlflow_uri, name, torchserve_url=torchserve.url + "/")

    first = register({"fid": 20.0, "mIoU": 0.5})
    register_call = torchserve.requests[0]
    assert torchserve.calls() == [("POST", "/models"), ("PUT", f"/models/{name}/1.0/set-default")]
    assert register_call["query"] == {
        "url": first["archive"]["file"],
        "model_name": name,
        "initial_workers": "1",
        "synchronous": "true",
    }
    assert register_call["auth"] == "Bearer secret-key"
    assert first["torchserve"]["registered"] and first["torchserve"]["default"]

    worse = register({"fid": 25.0, "mIoU": 0.5})  # registered (to be tried by version), not made default
    assert torchserve.calls() == [("POST", "/models")]
    assert worse["torchserve"] == {
        "url": torchserve.url,
        "model_name": name,
        "version": "2.0",
        "archive_url": worse["archive"]["file"],
        "registered": True,
        "already_registered": False,
        "default": False,
    }

    # already registered (409) counts as registered; an explicit archive URL and token are passed on
    torchserve.answers.append((409, {"code": 409, "message": "Model version 3.0 is already registered"}))
    better = register(
        {"fid": 15.0, "mIoU": 0.6}, torchserve_archive_url="https://models.example/s.mar", torchserve_token="other-key"
    )
    assert better["promoted"] and better["torchserve"]["already_registered"]
    assert torchserve.requests[0]["query"]["url"] == "https://models.example/s.mar"
    assert torchserve.requests[0]["auth"] == "Bearer other-key"
    assert torchserve.calls() == [("POST", "/models"), ("PUT", f"/models/{name}/3.0/set-default")]

    # a refusal names the server's message, and a version TorchServe cannot load does not become champion
    torchserve.answers.append((500, {"code": 500, "message": "Failed to load model: worker died"}))
    decision_out = tmp_path / "failed.json"
    with pytest.raises(SpadeError, match="HTTP 500: Failed to load model: worker died"):
        register({"fid": 10.0, "mIoU": 0.7}, decision_out=decision_out)
    assert torchserve.calls() == [("POST", "/models")]
    assert alias(client, name, "champion") == "3" and alias(client, name, "candidate") == "4"
    failed = json.loads(decision_out.read_text())
    assert not failed["promoted"] and "TorchServe could not load it" in failed["reason"]
    assert client.get_model_version(name, "4").tags["decision"] == "candidate"


def test_torchserve_errors_name_the_server_message_and_the_fix(torchserve):
    client = reg.TorchServe(torchserve.url, token=None, timeout=5)
    torchserve.answers.append((401, {"code": 401, "message": "Token Authorization failed"}))
    with pytest.raises(
        SpadeError, match=f"HTTP 401: Token Authorization failed; pass the management key.*{reg.TOKEN_ENV}"
    ):
        client.register("x.mar", "spade")
    assert torchserve.requests[-1]["auth"] is None
    torchserve.answers.append((404, {"code": 404, "message": "Model not found: spade"}))
    with pytest.raises(SpadeError, match="make version 2.0 of spade the default: HTTP 404: Model not found: spade"):
        client.set_default("spade", "2.0")
    torchserve.stop()
    with pytest.raises(SpadeError, match="cannot reach the TorchServe management API at http://127.0.0.1"):
        client.register("x.mar", "spade")


def test_archives_from_spade_package_carry_their_lineage(tmp_path):
    from serve_helpers import make_checkpoint
    from spade.serve.package import package

    meta = {"git_commit": "c0ffee", "dataset_fingerprint": "fp-pkg", "mlflow_run_id": "abc123", "iteration": 8}
    make_checkpoint(meta=meta).save(tmp_path / "final.pt")
    result = package(tmp_path / "final.pt", name="landscapes", version="3", out=tmp_path / "dist")
    archive = reg.read_archive(result.mar)
    assert (archive.model_name, archive.version, archive.serialized_file) == (
        "landscapes",
        "3",
        archive.serialized_file,
    )
    assert archive.lineage == {
        "git_commit": "c0ffee",
        "dataset_fingerprint": "fp-pkg",
        "iteration": 8,
        "source_checkpoint": str((tmp_path / "final.pt").resolve()),
        "training_run_id": "abc123",
        "preset": "custom",
    }


def test_registry_uri_precedence(monkeypatch, tmp_path):
    from spade.config import TrackingConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    meta = {"mlflow_tracking_uri": "http://training:5000"}
    assert reg.resolve_registry_uri(None, TrackingConfig(), meta) == "http://training:5000"
    assert reg.resolve_registry_uri(None, TrackingConfig(), {}) == f"sqlite:///{tmp_path.resolve() / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert reg.resolve_registry_uri(None, TrackingConfig(), meta) == "http://env:5000"
    assert (
        reg.resolve_registry_uri(None, TrackingConfig(tracking_uri="http://params:5000"), meta) == "http://params:5000"
    )
    assert reg.resolve_registry_uri("http://cli:5000", TrackingConfig(tracking_uri="http://params:5000"), meta) == (
        "http://cli:5000"
    )


def test_archive_url_for_torchserve():
    assert reg.archive_url_for_torchserve("s3://b/p/x.mar", "x.mar") == "x.mar"
    assert reg.archive_url_for_torchserve("/srv/store/x.mar", "x.mar") == "x.mar"
    assert reg.archive_url_for_torchserve("https://h/x.mar", "x.mar") == "https://h/x.mar"
    assert reg.archive_url_for_torchserve("/srv/x.mar", "x.mar", "http://cdn/x.mar") == "http://cdn/x.mar"


# --- the command line ---------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="spade register", epilog=reg.EXAMPLES)
    reg.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_command_line_reads_params_and_prints_or_writes_the_decision(tmp_path, client, mlflow_uri, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(
        "register:\n"
        f"  store: {tmp_path / 'cli-store'}\n"
        "  model_name: spade-cli\n"
        "  fid_tolerance: 2.0\n"
        "  miou_tolerance: 0.0\n"
        f"tracking:\n  tracking_uri: {mlflow_uri}\n"
    )
    run_id = training_run(client)
    capsys.readouterr()  # MLflow prints the run's link when it ends
    mar = make_mar(tmp_path, "archive-name", "1.0")  # no run in the archive: --run-id names it
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"fid": 30.0, "mIoU": 0.5}))

    assert (
        reg.main(parse("--mar", str(mar), "--metrics", str(metrics), "--params", str(params), "--run-id", run_id)) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert (
        printed["model_name"] == "spade-cli" and printed["promoted"] and printed["lineage"]["training_run_id"] == run_id
    )
    assert client.get_model_version("spade-cli", "1").run_id == run_id
    assert Path(printed["archive"]["uri"]).parent == (tmp_path / "cli-store").resolve()

    metrics.write_text(json.dumps({"fid": 31.5, "mIoU": 0.5}))  # within params.yaml's FID tolerance of 2
    out = tmp_path / "decision.json"
    argv = ["--mar", str(mar), "--metrics", str(metrics), "--params", str(params), "--decision-out", str(out)]
    assert reg.main(parse(*argv, "--set", "register.miou_tolerance=0.01")) == 0
    assert capsys.readouterr().out.strip() == f"spade-cli version 2: promoted; decision in {out}"
    written = json.loads(out.read_text())
    assert written["tolerances"] == {"fid": 2.0, "mIoU": 0.01} and written["promoted"]

    metrics.write_text(json.dumps({"fid": 32.0, "mIoU": 0.5}))
    assert reg.main(parse(*argv, "--fid-tolerance", "0.1")) == 0  # the option beats params.yaml
    assert json.loads(out.read_text())["decision"] == "candidate"
    assert alias(client, "spade-cli", "champion") == "2"


# --- bad input ----------------------------------------------------------------------------------


def test_bad_inputs_fail_with_clear_errors(tmp_path, mlflow_uri):
    good = make_mar(tmp_path, "spade-bad", "1.0")
    store = str(tmp_path / "store")

    def fails(match: str, **kwargs: object) -> None:
        args = {"mar": good, "metrics": {"fid": 1.0, "mIoU": 0.5}, "store": store, "tracking_uri": mlflow_uri}
        with pytest.raises(SpadeError, match=match):
            reg.register(**{**args, **kwargs})

    fails(r"archive not found: .*nope\.mar", mar=tmp_path / "nope.mar")
    (tmp_path / "plain.mar").write_text("not a zip")
    fails("plain.mar is not a model archive: not a zip file", mar=tmp_path / "plain.mar")
    with zipfile.ZipFile(tmp_path / "nomanifest.mar", "w") as zf:
        zf.writestr("model.pt", b"x")
    fails(r"has no MAR-INF/MANIFEST.json", mar=tmp_path / "nomanifest.mar")
    with zipfile.ZipFile(tmp_path / "lacking.mar", "w") as zf:
        zf.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "m", "serializedFile": "model.pt"}}))
    fails("lacking.mar lacks model.pt, the serialized file its manifest names", mar=tmp_path / "lacking.mar")
    with zipfile.ZipFile(tmp_path / "garbage.mar", "w") as zf:
        zf.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "m", "serializedFile": "model.pt"}}))
        zf.writestr("model.pt", b"garbage")
    fails("cannot read model.pt inside .*garbage.mar as a project checkpoint", mar=tmp_path / "garbage.mar")

    fails(r"metrics file not found: .*missing\.json.*spade evaluate", metrics=tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    fails("broken.json is not valid JSON", metrics=tmp_path / "broken.json")
    (tmp_path / "other.json").write_text(json.dumps({"FID": 3.0, "miou": 0.5}))
    fails(r"other.json has neither 'fid' nor 'mIoU'.*register.fid_key", metrics=tmp_path / "other.json")
    fails(r"metrics: fid must be a number \(or null\), got 'low'", metrics={"fid": "low"})
    fails(r"fid_tolerance must be a number >= 0", fid_tolerance=-1.0)

    fails("--run-id 0123456789abcdef0123456789abcdef: no such run at", run_id="0123456789abcdef0123456789abcdef")
    fails(
        rf"cannot reach MLflow at http://127.0.0.1:{(port := free_port())}.*--tracking-uri",
        tracking_uri=f"http://127.0.0.1:{port}",
    )
    assert not (tmp_path / "store").exists()  # nothing was stored for any of these

    # a metrics.json with other key names works once the keys are configured
    decision = reg.register(
        mar=good,
        metrics=tmp_path / "other.json",
        store=store,
        tracking_uri=mlflow_uri,
        config=RegisterConfig(fid_key="FID", miou_key="miou"),
    )
    assert decision["candidate"] == {"fid": 3.0, "mIoU": 0.5}


def test_the_kserve_layout_is_stored_beside_the_archive_and_recorded_on_the_version(
    tmp_path, client, mlflow_uri, services, monkeypatch
):
    """What an InferenceService's storageUri must point at (config/ + model-store/) is stored with each
    version, locally and in S3, and its URI is on the version: deployment reads it, nothing hard-codes it."""
    from serve_helpers import make_checkpoint
    from spade.serve.package import package

    make_checkpoint().save(tmp_path / "final.pt")
    built = package(tmp_path / "final.pt", name="kslayout", version="7", out=tmp_path / "dist")
    decision = reg.register(
        mar=built.mar, metrics={"fid": 10.0, "mIoU": 0.5}, store=str(tmp_path / "store"), tracking_uri=mlflow_uri
    )
    kserve = Path(decision["archive"]["kserve_uri"])
    assert kserve == (tmp_path / "store" / decision["archive"]["file"].removesuffix(".mar") / "kserve").resolve()
    assert (kserve / "config" / "config.properties").read_text() == built.config_properties.read_text()
    assert (kserve / "model-store" / "kslayout.mar").read_bytes() == built.mar.read_bytes()
    assert client.get_model_version("kslayout", decision["version"]).tags["kserve_uri"] == str(kserve)

    # in an object store: under the same prefix as the archive
    for key, value in services["s3"].items():
        monkeypatch.setenv(key, value)
    in_s3 = reg.register(
        mar=built.mar, metrics={"fid": 10.0, "mIoU": 0.5}, store=f"s3://{BUCKET}/models", tracking_uri=mlflow_uri,
        model_name="kslayout-s3",
    )  # fmt: skip
    stem = in_s3["archive"]["file"].removesuffix(".mar")
    assert in_s3["archive"]["kserve_uri"] == f"s3://{BUCKET}/models/{stem}/kserve"
    keys = {
        o["Key"] for o in services["s3_client"].list_objects_v2(Bucket=BUCKET, Prefix=f"models/{stem}/")["Contents"]
    }
    assert keys == {f"models/{stem}/kserve/config/config.properties", f"models/{stem}/kserve/model-store/kslayout.mar"}

    # a layout that holds another archive is refused before anything is stored
    other = package(tmp_path / "final.pt", name="kslayout", version="8", out=tmp_path / "dist8")
    with pytest.raises(SpadeError, match="is not the archive being registered"):
        reg.register(mar=built.mar, metrics={"fid": 9.0, "mIoU": 0.5}, store=str(tmp_path / "store"),
                     tracking_uri=mlflow_uri, kserve=other.kserve_root)  # fmt: skip
