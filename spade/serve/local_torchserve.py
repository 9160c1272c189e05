"""A private TorchServe on 127.0.0.1: for tests, benchmarks and trying an archive before shipping it.

Each instance gets its own free ports, working directory (the token key file lands
there), temp directory (TorchServe's pid file and worker sockets) and worker port
range, so several can run beside each other and beside a user's own TorchServe.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from spade.errors import SpadeError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchserve_command() -> str:
    exe = Path(sys.executable).with_name("torchserve")
    if exe.is_file():
        return str(exe)
    found = shutil.which("torchserve")
    if not found:
        raise SpadeError("torchserve is not installed; install it with: pip install torchserve (it needs Java 17)")
    return found


class LocalTorchServe:
    """Start with `start()` (or as a context manager); `stop()` ends the server and its workers.

    `base_config`: a config.properties to start from (e.g. the KServe layout's); its
    addresses, model store and temp settings are replaced by private ones (on 127.0.0.1).
    `token_auth`: True / False turns token authorization on / off; None keeps what `base_config` says
    (as its model API setting is kept), to run a shipped configuration as it is.
    `models`: "name=file.mar" entries to load at start (a config's model_snapshot also loads).
    `image`: run TorchServe in a container of this image (e.g. the project's spade:dev) instead of from this
    environment: host network, the image's own user, the model store (read-only) and the working directory
    mounted at their own paths, so the addresses, paths and key file are the same as without one.
    """

    def __init__(
        self,
        model_store: str | Path,
        *,
        models: list[str] | None = None,
        base_config: str | Path | None = None,
        token_auth: bool | None = True,
        workdir: str | Path | None = None,
        extra_config: dict[str, str] | None = None,
        image: str | None = None,
    ) -> None:
        self.model_store = Path(model_store).resolve()
        self.models = list(models or [])
        self.base_config = Path(base_config) if base_config else None
        self.token_auth = token_auth
        self.workdir = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix="spade-torchserve-"))
        self.extra_config = dict(extra_config or {})
        self.image = image
        self.container = f"spade-torchserve-{os.getpid()}-{id(self):x}" if image else None
        self.inference_port = free_port()
        self.management_port = free_port()
        self.metrics_port = free_port()
        self.process: subprocess.Popen | None = None

    # ---------------------------------------------------------------- addresses and keys

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def _keys(self) -> dict:
        path = self.workdir / "key_file.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # not written yet, or being written
            return {}

    @property
    def inference_key(self) -> str | None:
        return self._keys().get("inference", {}).get("key")

    @property
    def management_key(self) -> str | None:
        return self._keys().get("management", {}).get("key")

    def headers(self, api: str = "inference") -> dict[str, str]:
        key = self.inference_key if api == "inference" else self.management_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    # ---------------------------------------------------------------- life cycle

    def _config_text(self) -> str:
        lines: list[str] = []
        if self.base_config is not None:
            replaced = ("inference_address", "management_address", "metrics_address", "model_store", "vmargs")
            for line in self.base_config.read_text().splitlines():
                key = line.split("=", 1)[0].strip()
                if key in replaced or (key == "disable_token_authorization" and self.token_auth is not None):
                    continue
                lines.append(line)
        base_keys = {line.split("=", 1)[0].strip() for line in lines if "=" in line}
        tmp = self.workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        worker_port = free_port()
        settings = {
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": f"http://127.0.0.1:{self.metrics_port}",
            "grpc_inference_port": str(free_port()),
            "grpc_management_port": str(free_port()),
            "model_store": str(self.model_store),
            "initial_worker_port": str(worker_port),
            "vmargs": f"-Xmx1g -XX:+ExitOnOutOfMemoryError -Djava.io.tmpdir={tmp}",
            **self.extra_config,
        }
        if self.base_config is None or "enable_model_api" not in base_keys:
            settings.setdefault("enable_model_api", "true")
        if self.token_auth is not None:
            settings.setdefault("disable_token_authorization", "false" if self.token_auth else "true")
        keys = {line.split("=", 1)[0].strip() for line in lines if "=" in line}
        for key in settings:
            if key in keys:
                lines = [ln for ln in lines if ln.split("=", 1)[0].strip() != key]
        lines += [f"{k}={v}" for k, v in settings.items()]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 120.0) -> LocalTorchServe:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.properties"
        config.write_text(self._config_text())
        torchserve = "torchserve" if self.image else _torchserve_command()
        cmd = [torchserve, "--start", "--foreground", "--ncs", "--ts-config", str(config)]
        cmd += ["--model-store", str(self.model_store)]
        if self.models:
            cmd += ["--models", *self.models]
        own = {"TMPDIR": str(self.workdir / "tmp"), "LOG_LOCATION": str(self.workdir / "logs")}
        own["METRICS_LOCATION"] = own["LOG_LOCATION"]
        env = dict(os.environ, **own)
        if self.image:
            # the container's user writes the logs, the key file and its temporary files here
            for folder in (self.workdir, self.workdir / "tmp"):
                folder.chmod(0o777)
            docker = ["docker", "run", "--rm", "--init", "--network", "host", "--name", self.container]
            docker += ["-v", f"{self.workdir}:{self.workdir}", "-v", f"{self.model_store}:{self.model_store}:ro"]
            docker += ["-w", str(self.workdir), *[f"--env={k}={v}" for k, v in own.items()], self.image]
            cmd = docker + cmd
        log = open(self.workdir / "torchserve.out", "wb")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.process = subprocess.Popen(
            cmd, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                code = self.process.poll()
                if code is not None:
                    raise SpadeError(f"torchserve exited with {code}:\n{self.log_tail()}")
                if self._ready():
                    return self
                time.sleep(0.5)
            raise SpadeError(f"torchserve did not become ready in {timeout:.0f} s:\n{self.log_tail()}")
        except BaseException:  # never leave a server behind when starting fails or is interrupted
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.token_auth and not self.inference_key:
            return False  # token authorization on: the key file comes first
        try:
            models = self.request("GET", "/models", api="management")
        except (OSError, SpadeError):
            return False
        names = [m["modelName"] for m in models.get("models", [])]
        expected = {m.split("=", 1)[0] for m in self.models}
        if not expected.issubset(names):
            return False
        return all(self.workers_ready(name) for name in names)

    def workers_ready(self, name: str) -> bool:
        try:
            info = self.request("GET", f"/models/{name}", api="management")
        except (OSError, SpadeError):
            return False
        workers = [w for model in info for w in model.get("workers", [])]
        return bool(workers) and all(w.get("status") == "READY" for w in workers)

    def request(self, method: str, path: str, *, api: str = "management", body: bytes | None = None) -> object:
        base = self.management_url if api == "management" else self.inference_url
        req = urllib.request.Request(base + path, data=body, method=method, headers=self.headers(api))
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                data = resp.read()
        except urllib.error.HTTPError as err:
            raise SpadeError(f"{method} {path}: HTTP {err.code}: {err.read().decode(errors='replace')}") from None
        return json.loads(data) if data else {}

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for name in ("torchserve.out", "logs/ts_log.log", "logs/model_log.log"):
            path = self.workdir / name
            if path.is_file():
                out.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        if proc is not None and self.container:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(["docker", "rm", "-f", self.container], capture_output=True, timeout=60)
        if proc is not None:
            # workers are in the same session; make sure none outlives the frontend
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LocalTorchServe:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
