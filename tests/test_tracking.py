"""MLflow tracking of `spade train`, read back from a real `mlflow server` (and the embedded SQLite default):
what a run records, resume into the same run, and a tracking server that goes away while training runs."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spade.checkpoints import Checkpoint
from spade.config import load_settings
from spade.data.synthetic import generate_builtin_dataset
from spade.train.checkpointing import list_checkpoints
from spade.train.loop import loader_workers
from train_helpers import SPADE, MlflowServer, child_env, tiny_params, wait_for, write_params

REPO = Path(__file__).resolve().parents[1]
LOSSES = ("G_GAN", "G_feat", "D_real", "D_fake")
METRICS = (*LOSSES, "lr_G", "lr_D", "images_per_sec")
CROP, GAP, NUM_SAMPLES = 32, 2, 4  # tiny_params' crop_size, sample_grid's gap, train.num_samples' default


def client_for(uri: str):  # noqa: ANN201
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def builtin_32(tmp_path_factory) -> Path:
    return generate_builtin_dataset(
        tmp_path_factory.mktemp("builtin") / "data", count=24, val_count=8, size=32, progress=False
    )


class _Boot:
    """The module's tracking server, started on a thread so that a test that does not need it runs meanwhile."""

    def __init__(self, server: MlflowServer) -> None:
        self.server = server
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._start, name="mlflow-server-start", daemon=True)
        self.thread.start()

    def _start(self) -> None:
        try:
            self.server.start()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test that waits for the server
            self.error = exc

    def ready(self) -> MlflowServer:
        self.thread.join()
        if self.error is not None:
            raise self.error
        if self.server.proc is None or self.server.proc.poll() is not None:
            self.server.start()  # an earlier test stopped it on purpose: same port, same store
        return self.server


@pytest.fixture(scope="module")
def server_boot(tmp_path_factory):
    """Starts one real `mlflow server` (127.0.0.1, SQLite store) in the background; stopped at module end."""
    boot = _Boot(MlflowServer(tmp_path_factory.mktemp("mlflow")))  # MlflowServer turns MLflow's job runner off
    try:
        yield boot
    finally:
        boot.thread.join()
        boot.server.stop()


@pytest.fixture
def server(server_boot) -> MlflowServer:
    return server_boot.ready()


def tracked_params(data: Path, out: Path, uri: str, experiment: str, train: dict | None = None, **tracking) -> dict:
    return tiny_params(
        data,
        out,
        train=train or {},
        tracking={"enabled": True, "tracking_uri": uri, "experiment": experiment, **tracking},
    )


def run_train(params_file: Path, *args: str, **popen) -> subprocess.CompletedProcess:
    popen.setdefault("env", child_env())
    popen.setdefault("cwd", REPO)
    proc = subprocess.run([*SPADE, "train", "--params", str(params_file), *args], capture_output=True, text=True,
                          timeout=300, **popen)  # fmt: skip
    assert proc.returncode == 0, f"spade train exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


@contextlib.contextmanager
def training(params_file: Path, log: Path, *args: str):
    """`spade train` in the background, stderr to `log` (no pipe to fill up); killed if the test fails."""
    with log.open("w") as err:
        proc = subprocess.Popen([*SPADE, "train", "--params", str(params_file), *args], stdout=subprocess.PIPE,
                                stderr=err, text=True, env=child_env(), cwd=REPO)  # fmt: skip
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def only_run(client, experiment: str):  # noqa: ANN001, ANN201
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"expected one run in {experiment}, found {len(runs)}"
    return runs[0]


def steps(client, run_id: str, metric: str) -> list[int]:  # noqa: ANN001
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def logged_run_id(uri: str, experiment: str) -> str | None:
    """The run's id once its first metric is on the server, else None."""
    try:
        client = client_for(uri)
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and client.get_metric_history(runs[0].info.run_id, "G_GAN"):
            return runs[0].info.run_id
    except Exception:  # noqa: BLE001 - not there yet
        return None
    return None


def read_curves(out_dir: Path) -> dict[int, dict[str, float]]:
    lines = (out_dir / "loss_curves.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, map(float, line.split(",")), strict=True)) for line in lines[1:]]
    return {int(r["iteration"]): r for r in rows}


def logged_rows(out_dir: Path) -> int:
    """Complete rows of loss_curves.csv so far (the file may be half-written when read)."""
    path = out_dir / "loss_curves.csv"
    return max(path.read_text().count("\n") - 1, 0) if path.is_file() else 0


def expected_params(params_file: Path, dataset_size: int) -> dict[str, str]:
    """Every resolved setting as section.key, plus what the run adds; MLflow keeps parameter values as text."""
    settings = load_settings(params_file)
    sections = settings.to_dict().items()
    flat = {f"{section}.{key}": str(value) for section, body in sections for key, value in body.items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    added = {"world_size": "1", "device": device, "dataset_size": str(dataset_size)}
    workers = loader_workers(settings.data.num_workers, torch.device(device))
    # the tests' params name a precision
    return {**flat, **added, "precision_used": settings.train.precision, "num_workers_used": str(workers)}


def test_without_a_tracking_uri_runs_go_to_a_sqlite_file_in_the_working_folder(tmp_path, builtin_32, server_boot):
    """(Takes `server_boot` so that the module's tracking server starts while this test runs.)"""
    work = tmp_path / "work"
    work.mkdir()
    params = tiny_params(builtin_32, tmp_path / "out", train={"iterations": 2}, tracking={"enabled": True})
    params["tracking"]["experiment"] = "embedded"
    env = child_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    run_train(write_params(tmp_path / "p.yaml", params), cwd=work, env=env)

    db = work / "mlruns.db"
    assert db.is_file(), f"no mlruns.db in the working folder: {sorted(p.name for p in work.iterdir())}"
    client = client_for(f"sqlite:///{db}")
    run = only_run(client, "embedded")
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).artifact_location == (work / "mlartifacts").as_uri()
    assert steps(client, run.info.run_id, "G_GAN") == [1, 2]
    assert run.data.params["train.iterations"] == "2"
    stored = list((work / "mlartifacts").glob("**/model/final.pt"))
    assert len(stored) == 1, "the final model is not under ./mlartifacts"
    model = Checkpoint.load(client.download_artifacts(run.info.run_id, "model/final.pt", str(tmp_path)))
    assert model.config.ngf == 8


def test_a_run_on_a_tracking_server_records_params_metrics_samples_model_and_lineage(tmp_path, builtin_32, server):
    experiment = f"recorded-{tmp_path.name}"
    total, log_every, sample_every = 7, 2, 3
    a = write_params(
        tmp_path / "a.yaml",
        tracked_params(builtin_32, tmp_path / "a", server.uri, experiment,
                       {"iterations": total, "log_every": log_every, "sample_every": sample_every}, run_name="a"),
    )  # fmt: skip
    run_train(a)

    client = client_for(server.uri)
    run = only_run(client, experiment)
    run_id = run.info.run_id
    assert run.info.run_name == "a"
    assert run.info.status == "FINISHED"

    # every resolved setting, with its value
    params = run.data.params
    assert params == expected_params(a, dataset_size=24)
    assert params["train.batch_size"] == "4" and params["model.ngf"] == "8" and params["data.root"] == str(builtin_32)
    assert params["train.iterations"] == str(total) and params["tracking.experiment"] == experiment

    # one value per logged step: every log_every iterations and at the last one; equal to loss_curves.csv
    logged = [2, 4, 6, 7]
    curves = read_curves(tmp_path / "a")
    assert sorted(curves) == logged
    for name in METRICS:
        history = client.get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == logged, name
        for m in history:
            assert m.value == pytest.approx(curves[m.step][name], rel=1e-5, abs=1e-9), (name, m.step)
    lr_g = {m.step: m.value for m in client.get_metric_history(run_id, "lr_G")}
    lr_d = {m.step: m.value for m in client.get_metric_history(run_id, "lr_D")}
    assert lr_g[2] == pytest.approx(0.0001) and lr_d[2] == pytest.approx(0.0004)
    assert lr_g[7] < lr_g[6] < 0.0001, "the learning rate decays linearly in the second half"
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "images_per_sec"))
    assert not client.get_metric_history(run_id, "G_VGG"), "no VGG loss in this run"

    # sample grids: label | real | synthesized, one row per preview sample, equal to the local copies
    samples = sorted(f.path for f in client.list_artifacts(run_id, "samples"))
    assert samples == [f"samples/iter_{i:08d}.png" for i in (3, 6, 7)]
    downloaded = Path(client.download_artifacts(run_id, "samples", str(tmp_path / "dl")))
    for path in samples:
        name = Path(path).name
        with Image.open(downloaded / name) as img:
            img.verify()
        with Image.open(downloaded / name) as img:
            width, height = img.size
            pixels = np.asarray(img.convert("RGB"))
        row = (height - GAP * (NUM_SAMPLES - 1)) / NUM_SAMPLES
        assert row == CROP and width == 3 * row + 2 * GAP, f"{name} is {width}x{height}, not 3 panels per row"
        with Image.open(tmp_path / "a" / "samples" / name) as local:
            assert np.array_equal(pixels, np.asarray(local.convert("RGB")))

    # the final model, loadable and equal to the local one
    assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/final.pt"]
    model = Checkpoint.load(client.download_artifacts(run_id, "model/final.pt", str(tmp_path / "dl")))
    local = Checkpoint.load(tmp_path / "a" / "final.pt")
    assert model.config == load_settings(a).model
    assert model.generator.keys() == local.generator.keys()
    assert all(torch.equal(model.generator[k], local.generator[k]) for k in local.generator)

    # lineage tags
    tags = run.data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert tags["git_commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    assert tags["preset"] == "custom"
    assert re.fullmatch(r"[0-9a-f]{16}", tags["dataset_fingerprint"]), tags["dataset_fingerprint"]
    # (that two runs on the same data get the same fingerprint is checked by the resume test)


def test_a_resumed_run_continues_the_same_mlflow_run(tmp_path, builtin_32, server):
    experiment = f"resumed-{tmp_path.name}"
    total = 10
    params = tracked_params(builtin_32, tmp_path / "out", server.uri, experiment, {"iterations": total},
                            close_timeout=20)  # fmt: skip
    file = write_params(tmp_path / "p.yaml", params)
    ckpt_dir = tmp_path / "out" / "checkpoints"
    with training(file, tmp_path / "first.log") as proc:
        wait_for(lambda: (ckpt_dir / "iter_00000002.pt").exists() or proc.poll() is not None, 120, "first checkpoint")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 143, (tmp_path / "first.log").read_text()[-3000:]
    stopped_at, name = list_checkpoints(str(ckpt_dir))[-1]
    assert 2 <= stopped_at < total, f"the run was not interrupted mid-way (stopped at {stopped_at})"
    run_id = Checkpoint.load(ckpt_dir / name).training["mlflow_run_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", run_id or ""), run_id

    client = client_for(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert steps(client, run_id, "G_GAN") == list(range(1, stopped_at + 1))
    fingerprint = run.data.tags["dataset_fingerprint"]

    # resume with a different tracking setting: had the parameters been logged again, MLflow would refuse
    # the changed value and the parameters would end up in unsent_tracking.jsonl
    statuses = []  # the run's status whenever the server has steps of the resumed training

    def watch(proc: subprocess.Popen) -> bool:
        if proc.poll() is not None:
            return True
        if max(steps(client, run_id, "G_GAN"), default=0) > stopped_at:
            statuses.append(client.get_run(run_id).info.status)
        return False

    log = tmp_path / "resumed.log"
    with training(file, log, "--resume", "--set", "tracking.close_timeout=5") as proc:
        wait_for(lambda: watch(proc), 120, "the resumed training")
        proc.communicate(timeout=60)
    stderr = log.read_text()
    assert proc.returncode == 0, stderr[-3000:]
    for problem in ("unreachable", "rejected", "could not reach"):
        assert problem not in stderr, stderr[-2000:]
    assert not (tmp_path / "out" / "unsent_tracking.jsonl").exists()
    assert statuses and "KILLED" not in statuses, f"a resumed run shows as {statuses} while it trains"
    assert only_run(client, experiment).info.run_id == run_id, "resuming started a new MLflow run"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset_fingerprint"] == fingerprint, "two runs on the same data, two fingerprints"
    original = str(load_settings(file).tracking.close_timeout)
    assert run.data.params["tracking.close_timeout"] == original, "parameters were logged again on resume"
    for metric in METRICS:
        assert steps(client, run_id, metric) == list(range(1, total + 1)), metric
    final = Checkpoint.load(ckpt_dir / f"iter_{total:08d}.pt")
    assert final.training["mlflow_run_id"] == run_id
    assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/final.pt"]


def test_events_the_server_refuses_are_set_aside_not_retried(tmp_path, server, monkeypatch, capsys):
    """A refusal (here: changing a logged parameter) is not an outage: the other events go on, nothing waits
    for close_timeout, and the refused event is kept in unsent_tracking.jsonl with the server's answer."""
    from spade.config import TrackingConfig
    from spade.train.tracking import MLflowTracker

    # the tracker sets these for its whole process: set them here so that they are undone after the test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    experiment = f"refused-{tmp_path.name}"
    cfg = TrackingConfig(tracking_uri=server.uri, experiment=experiment, retry_seconds=0.2, close_timeout=20)
    tracker = MLflowTracker(cfg, out_dir=tmp_path)
    tracker.log_params({"lr": 0.1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_params({"lr": 0.2})  # MLflow refuses to change a logged parameter
    tracker.log_metrics({"loss": 0.5}, step=2)
    start = time.monotonic()
    tracker.close()
    assert time.monotonic() - start < 10, "close() waited for the server as if it were away"
    stderr = capsys.readouterr().err
    assert "unreachable" not in stderr and stderr.count("rejected a params event") == 1, stderr

    client = client_for(server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    assert steps(client, tracker.run_id, "loss") == [1, 2]
    unsent = [json.loads(line) for line in (tmp_path / "unsent_tracking.jsonl").read_text().splitlines()]
    assert len(unsent) == 1 and unsent[0]["kind"] == "params" and unsent[0]["params"] == {"lr": "0.2"}
    assert "INVALID_PARAMETER_VALUE" in unsent[0]["error"]
    unsent_file = tmp_path / "unsent_tracking.jsonl"
    assert f"1 tracking event(s) were rejected by {server.uri}; they are in {unsent_file}" in stderr
    assert "could not reach" not in stderr


def outage_params(tmp_path: Path, data: Path, uri: str, total: int, close_timeout: float) -> Path:
    experiment = f"outage-{tmp_path.name}"
    params = tracked_params(data, tmp_path / "out", uri, experiment, {"iterations": total, "checkpoint_every": 1000},
                            retry_seconds=0.5, close_timeout=close_timeout)  # fmt: skip
    return write_params(tmp_path / "p.yaml", params)


def test_training_outlives_a_tracking_outage_and_catches_up(tmp_path, builtin_32, server):
    total = 40
    file = outage_params(tmp_path, builtin_32, server.uri, total, close_timeout=60)
    experiment = load_settings(file).tracking.experiment
    log = tmp_path / "train.log"
    with training(file, log) as proc:
        run_id = wait_for(lambda: logged_run_id(server.uri, experiment), 120, "the first metrics on the server")
        server.stop()
        # training goes on without the server: every iteration is done while it is away
        wait_for(lambda: logged_rows(tmp_path / "out") == total or proc.poll() is not None, 120, "training")
        assert proc.poll() is None, f"training ended while the server was away:\n{log.read_text()[-3000:]}"
        server.start()  # same port, same SQLite store and artifact folder, within close_timeout
        proc.communicate(timeout=120)
    stderr = log.read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert stderr.count("is unreachable") == 1, stderr[-3000:]
    assert stderr.count("is back; catching up") == 1, stderr[-3000:]
    assert not (tmp_path / "out" / "unsent_tracking.jsonl").exists()

    client = client_for(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for metric in METRICS:
        assert steps(client, run_id, metric) == list(range(1, total + 1)), metric
    assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/final.pt"]


def test_events_the_server_never_got_are_saved_next_to_the_run(tmp_path, builtin_32, server):
    """The server goes away for good: training ends normally and leaves the unsent events in a file.
    (Leaves the module's server stopped; a later test's `server` would start it again.)"""
    total = 30
    file = outage_params(tmp_path, builtin_32, server.uri, total, close_timeout=3)
    experiment = load_settings(file).tracking.experiment
    log = tmp_path / "train.log"
    with training(file, log) as proc:
        run_id = wait_for(lambda: logged_run_id(server.uri, experiment), 120, "the first metrics on the server")
        server.stop()
        proc.communicate(timeout=120)
    stderr = log.read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert stderr.count("is unreachable") == 1, stderr[-3000:]
    unsent = tmp_path / "out" / "unsent_tracking.jsonl"
    assert unsent.is_file(), stderr[-3000:]
    assert f"they are in {unsent}" in stderr

    events = [json.loads(line) for line in unsent.read_text().splitlines()]
    unsent_steps = [e["step"] for e in events if e["kind"] == "metrics"]
    assert unsent_steps and all(set(METRICS) <= set(e["metrics"]) for e in events if e["kind"] == "metrics")
    assert {"kind": "artifact", "local": str(tmp_path / "out" / "final.pt"), "artifact_path": "model"} in events
    # nothing lost: what reached the server (read from its SQLite store) and the file cover every step once
    store = client_for(f"sqlite:///{server.root / 'mlflow.db'}")
    sent_steps = steps(store, run_id, "G_GAN")
    assert sorted(sent_steps + unsent_steps) == list(range(1, total + 1))


def test_a_server_that_is_down_at_start_gets_the_whole_run_when_it_comes_up(tmp_path, builtin_32, server):
    total = 30
    server.stop()
    file = outage_params(tmp_path, builtin_32, server.uri, total, close_timeout=60)
    experiment = load_settings(file).tracking.experiment
    log = tmp_path / "train.log"
    with training(file, log) as proc:
        wait_for(lambda: logged_rows(tmp_path / "out") >= 3 or proc.poll() is not None, 120, "training to start")
        assert proc.poll() is None, log.read_text()[-3000:]
        server.start()
        proc.communicate(timeout=120)
    stderr = log.read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert "will be created when the server answers" in stderr
    client = client_for(server.uri)
    run = only_run(client, experiment)
    assert run.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "G_GAN") == list(range(1, total + 1))
    assert run.data.params["train.iterations"] == str(total)
