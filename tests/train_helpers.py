"""Shared set-up for training tests: a tiny built-in dataset and a tiny model's params.yaml."""

from __future__ import annotations

import contextlib
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
            "precision": "float32",  # the exact path: resume and DDP tests compare numbers tightly
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
    """A real `mlflow server` on 127.0.0.1 with a SQLite store; `with MlflowServer(root) as server:` stops it."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        """Starts the server and waits until it answers; stops it again if it does not (or on interrupt)."""
        mlflow = Path(sys.executable).parent / "mlflow"
        self.log = open(self.root / f"mlflow-{self.port}.log", "ab")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = subprocess.Popen(
                [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
                stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                # MLflow 3's background job runner (huey workers) only slows a test server down
                env=child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
            )  # fmt: skip
            wait_for(self._healthy, 90, "mlflow server to answer")
        except BaseException:  # never leave a server behind when starting fails or is interrupted
            self.stop()
            raise
        return self

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

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


S3_TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def moto_s3(log_dir: Path, *buckets: str):
    """A real `moto_server` on 127.0.0.1 with empty `buckets`; yields (env pointing boto3 at it, client)."""
    import boto3

    port = free_port()
    env = {**S3_TEST_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    log_path = Path(log_dir) / f"moto-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True,
        )  # fmt: skip
        try:
            client = boto3.client(
                "s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                aws_access_key_id="testing", aws_secret_access_key="testing",
            )  # fmt: skip

            def up() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"moto_server exited: {log_path.read_text()[-2000:]}")
                try:
                    client.list_buckets()
                    return True
                except Exception:  # noqa: BLE001 - not listening yet
                    return False

            wait_for(up, 30, "moto_server to answer")
            for bucket in buckets:
                client.create_bucket(Bucket=bucket)
            yield env, client
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
