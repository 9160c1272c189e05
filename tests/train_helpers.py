"""Shared set-up for training tests: a tiny built-in dataset and a tiny model's params.yaml."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

SPADE = [sys.executable, "-m", "spade"]


def tiny_params(data_root: Path, out_dir: Path, **sections: dict) -> dict:
    params = {
        "model": {
            "preset": "custom",
            "label_nc": 8,
            "contain_dontcare_label": False,
            "use_instance": False,
            "crop_size": 32,
            "ngf": 8,
            "ndf": 8,
            "spade_hidden": 16,
        },
        "data": {"root": str(data_root), "load_size": 36},
        "train": {
            "out_dir": str(out_dir),
            "iterations": 6,
            "batch_size": 4,
            "vgg_loss": False,
            "log_every": 1,
            "sample_every": 0,
            "checkpoint_every": 2,
            "keep_checkpoints": 10,
            "deterministic": True,
        },
        "tracking": {"enabled": False},
    }
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    return params


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params))
    return path


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a SQLite store, stopped by the test."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        mlflow = Path(sys.executable).parent / "mlflow"
        self.log = open(self.root / f"mlflow-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            # MLflow 3's background job runner (huey workers) only slows a test server down
            env=child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        )  # fmt: skip
        wait_for(self._healthy, 90, "mlflow server to answer")
        return self

    def _healthy(self) -> bool:
        import urllib.request

        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"mlflow server exited: {(self.root / f'mlflow-{self.port}.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            import signal

            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if getattr(self, "log", None) is not None:
            self.log.close()
            self.log = None
