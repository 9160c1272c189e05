"""The DVC pipeline (dvc.yaml + params.yaml) run for real: `dvc repro` on the built-in landscapes with tiny
settings in a temporary git + DVC repository, re-runs limited to what a changed parameter touches, metrics
and plots, and `dvc push` / `dvc pull` through an S3 remote (a real `moto_server` on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train_helpers import S3_TEST_CREDENTIALS, moto_s3

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"
STAGES = {"builtin", "fetch", "segmenter", "pseudolabel", "train", "evaluate", "package"}
BUCKET = "spade-dvc"
# a small model on 16 scenes of 32 px, a few iterations of everything, no VGG, no MLflow
TINY = {
    "builtin": {"count": 12, "val_count": 4, "size": 32},
    "model": {"label_nc": 8, "crop_size": 32, "ngf": 8, "ndf": 8, "spade_hidden": 16},
    "data": {"load_size": 36},
    "train": {
        "iterations": 4,
        "batch_size": 4,
        "vgg_loss": False,
        "precision": "float32",
        "log_every": 1,
        "sample_every": 0,
        "checkpoint_every": 2,
    },
    "tracking": {"enabled": False},
    "segmenter": {"size": 32, "iterations": 4, "batch_size": 4},
    "pseudolabel": {"batch_size": 4},
    "evaluate": {"batch_size": 4, "tracking": False},
    "package": {"batch_size": 2},
}


@pytest.fixture(autouse=True, scope="module")
def _dvc_installed():
    # no skipping: DVC is part of the dev install
    assert DVC.is_file(), f"{DVC} is missing: install the dev extra (pip install -e '.[dev]')"


class DvcRepo:
    def __init__(self, root: Path, env: dict) -> None:
        self.root = root
        self.env = env

    def run(self, *args: str, check: bool = True, env: dict | None = None) -> str:
        proc = subprocess.run([*args], cwd=self.root, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        out = proc.stdout + proc.stderr
        if check:
            assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}"
        return out

    def dvc(self, *args: str, **kwargs) -> str:  # noqa: ANN003
        return self.run(str(DVC), *args, **kwargs)

    def repro(self) -> set[str]:
        """`dvc repro`; the stages it ran."""
        return set(re.findall(r"Running stage '([^']+)'", self.dvc("repro")))

    @property
    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def set_param(self, section: str, key: str, value: object) -> None:
        params = self.params
        params[section][key] = value
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def changed_stages(self) -> set[str]:
        """Stages `dvc status` reports as changed."""
        status = json.loads(self.dvc("status", "--json"))
        return {name.split(":")[-1] for name in status}


def tiny_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params.setdefault(section, {}).update(values)
    return params


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> DvcRepo:
    """A git + DVC repository holding the project's dvc.yaml, a copy of spade/ (the code the stages depend
    on) and params.yaml with tiny settings, after a first `dvc repro`."""
    base = tmp_path_factory.mktemp("dvc")
    root = base / "repo"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "spade", root / "spade", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))},
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(base / "dvc-site-cache"),
        "DVC_GLOBAL_CONFIG_DIR": str(base / "dvc-global"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(base),
    }
    r = DvcRepo(root, env)
    r.run("git", "init", "-q")
    r.dvc("init", "-q")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    r.ran_first = r.repro()
    return r


def test_repro_runs_every_stage_with_metrics_and_plots(repo):
    assert repo.ran_first == STAGES
    params = repo.params
    out_dir = Path(params["train"]["out_dir"])
    evaluation = repo.root / params["evaluate"]["out"]
    for path in (
        params["fetch"]["out"] + "/classes.txt",
        params["segmenter"]["out"],
        params["pseudolabel"]["out"] + "/manifest.jsonl",
        out_dir / "final.pt",
        out_dir / "loss_curves.csv",
        evaluation / "samples.png",
        f"{params['package']['out']}/{params['package']['name']}.mar",
        f"{params['package']['out']}/kserve/config/config.properties",
    ):
        assert (repo.root / path).is_file(), path
    # training read the pseudo-labelled photos: as many as the built-in training scenes
    pseudo = repo.root / params["pseudolabel"]["out"]
    assert len(list((pseudo / "train_label").glob("*.png"))) == params["builtin"]["count"]
    assert not any(p.is_symlink() for p in (pseudo / "train_img").iterdir())

    metrics = json.loads(repo.dvc("metrics", "show", "--json"))
    (workspace,) = metrics.values()  # the only revision: the workspace of a repository without commits
    shown = workspace["data"][f"{params['evaluate']['out']}/metrics.json"]["data"]
    written = json.loads((evaluation / "metrics.json").read_text())
    assert {k: shown[k] for k in ("mIoU", "accuracy")} == {k: written[k] for k in ("mIoU", "accuracy")}
    assert 0.0 <= shown["mIoU"] <= 1.0 and shown["counts"]["images"] == params["builtin"]["val_count"]

    plots = json.loads(repo.dvc("plots", "show", "--json"))["data"]
    losses = plots["training_losses"][0]["content"]["data"]["values"]
    assert {row["field"] for row in losses} == {"G_GAN", "G_feat", "D_real", "D_fake"}
    assert {int(row["iteration"]) for row in losses} == set(range(1, params["train"]["iterations"] + 1))
    assert f"{params['evaluate']['out']}/samples.png" in plots

    lock = yaml.safe_load((repo.root / "dvc.lock").read_text())["stages"]
    assert set(lock) == STAGES
    assert lock["evaluate"]["params"]["params.yaml"]["evaluate.batch_size"] == TINY["evaluate"]["batch_size"]
    assert repo.changed_stages() == set()
    # bytecode caches beside the code the stages depend on are not code changes (.dvcignore)
    cache = repo.root / "spade" / "train" / "__pycache__"
    cache.mkdir()
    (cache / "loop.cpython-312.pyc").write_bytes(b"not code")
    assert repo.changed_stages() == set()


def test_an_evaluate_parameter_reruns_only_evaluate(repo):
    final = repo.root / repo.params["train"]["out_dir"] / "final.pt"
    before = final.stat().st_mtime_ns
    repo.set_param("evaluate", "batch_size", 2)
    assert repo.changed_stages() == {"evaluate"}
    assert repo.repro() == {"evaluate"}
    assert final.stat().st_mtime_ns == before
    assert repo.changed_stages() == set()


def test_fetching_the_same_data_again_reruns_nothing_downstream(repo):
    fetched = repo.root / repo.params["fetch"]["out"] / "fetch.json"
    assert json.loads(fetched.read_text())["layout"] == "custom"
    repo.set_param("fetch", "layout", "custom")  # was auto: the same files, so the same output hash
    assert repo.changed_stages() == {"fetch"}
    assert repo.repro() == {"fetch"}
    assert repo.changed_stages() == set()


def test_a_train_parameter_reruns_train_and_what_depends_on_it(repo):
    repo.set_param("train", "iterations", 3)
    assert repo.changed_stages() == {"train"}  # the stages downstream change once train's outputs do
    assert repo.repro() == {"train", "evaluate", "package"}
    curves = (repo.root / repo.params["train"]["out_dir"] / "loss_curves.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in curves[1:]] == ["1", "2", "3"]
    assert repo.changed_stages() == set()


def sha256_tree(root: Path, paths: list[str]) -> dict[str, str]:
    """Checksums of the files under `paths`, but spade fetch's marker (in .dvcignore: not data, not stored)."""
    found = {}
    for path in paths:
        p = root / path
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file() and f.name != ".spade-fetch":
                found[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return found


@pytest.fixture
def s3_endpoint(tmp_path):
    """A moto S3 server on 127.0.0.1 with one empty bucket; yields its URL."""
    with moto_s3(tmp_path, BUCKET) as (env, client):
        yield env["AWS_ENDPOINT_URL"], client


def test_push_to_an_s3_remote_and_pull_back_bit_identical(repo, s3_endpoint):
    url, client = s3_endpoint
    repo.dvc("remote", "add", "-d", "storage", f"s3://{BUCKET}/spade")
    repo.dvc("remote", "modify", "storage", "endpointurl", url)
    assert f"endpointurl = {url}" in (repo.root / ".dvc" / "config").read_text()

    params = repo.params
    lock = yaml.safe_load((repo.root / "dvc.lock").read_text())["stages"]
    cached = sorted({out["path"] for stage in lock.values() for out in stage.get("outs", [])} - {
        f"{params['train']['out_dir']}/checkpoints", f"{params['evaluate']['out']}/metrics.json"})  # fmt: skip
    assert f"{params['train']['out_dir']}/loss_curves.csv" in cached
    before = sha256_tree(repo.root, cached)
    assert len(before) > 30

    repo.dvc("push", env=S3_TEST_CREDENTIALS)
    stored = client.list_objects_v2(Bucket=BUCKET, Prefix="spade/").get("KeyCount", 0)
    assert stored >= len(set(before.values()))

    shutil.rmtree(repo.root / ".dvc" / "cache")
    for path in cached:
        p = repo.root / path
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert "deleted" in repo.dvc("status")

    repo.dvc("pull", env=S3_TEST_CREDENTIALS)
    assert sha256_tree(repo.root, cached) == before
    assert repo.changed_stages() == set()
    assert repo.repro() == set()
