"""The MLflow seam: a tracker that never stops training.

Calls from the training loop only put events on a queue; a background thread
sends them to MLflow. If the tracking server goes away, the thread says so once,
keeps the events and retries; when the server is back it catches up. An event the
server answers with a refusal (a 4xx MLflow error: a deleted or unknown run, a changed
parameter value) is not an outage: it is set aside, so that it does not hold up the
others. Events it still cannot send at the end, and the refused ones, are written to
`unsent_tracking.jsonl` in the run's output folder and the gap is reported, so
nothing is lost silently.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spade.config import TrackingConfig

DEFAULT_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
MAX_BUFFERED = 100_000
# 4xx answers that may pass (authentication, timeouts, rate limits): those are retried like an outage
TRANSIENT_STATUSES = {401, 403, 408, 429}


def resolve_tracking_uri(cfg: TrackingConfig, workdir: Path | None = None) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else a SQLite file in the working directory."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(workdir or Path.cwd()).resolve() / DEFAULT_DB}"


def git_commit(cwd: Path | None = None) -> str:
    """The current git commit, or $GIT_COMMIT, or 'unknown'."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        return out or "unknown"
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GIT_COMMIT", "unknown")


def _refused(exc: Exception, remote: bool) -> bool:
    """True when the tracking store refused the request (sending it again would not help). A remote
    server counts only when MLflow itself answered (a JSON error), not a proxy in front of it."""
    from mlflow.exceptions import MlflowException, RestException

    if not isinstance(exc, RestException if remote else MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status not in TRANSIENT_STATUSES


class Tracker:
    """No-op tracker: what non-zero ranks and disabled tracking use."""

    run_id: str | None = None

    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_image(self, image: np.ndarray, path: str) -> None: ...
    def log_artifact(self, local: str | Path, artifact_path: str | None = None) -> None: ...
    def close(self, status: str = "FINISHED", timeout: float | None = None) -> None: ...


@dataclass
class _Event:
    kind: str
    payload: dict = field(default_factory=dict)


class MLflowTracker(Tracker):
    """An MLflow run fed from a background thread; resumes `run_id` when given."""

    def __init__(
        self,
        cfg: TrackingConfig,
        *,
        out_dir: Path,
        run_id: str | None = None,
        workdir: Path | None = None,
    ) -> None:
        # fail fast on an unreachable server instead of retrying for minutes inside one call
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.uri = resolve_tracking_uri(cfg, workdir)
        self.out_dir = out_dir
        self.client = MlflowClient(tracking_uri=self.uri)
        self.retry_seconds = cfg.retry_seconds
        self.close_timeout = cfg.close_timeout
        self._deadline = float("inf")
        self._cfg, self._workdir = cfg, workdir
        self.run_id = run_id
        if self.run_id is None:
            try:
                self.run_id = self._create_run(cfg, workdir)
            except Exception as exc:  # noqa: BLE001 - the server may come up later: create the run then
                print(
                    f"warning: MLflow tracking at {self.uri} is unreachable ({type(exc).__name__}); training "
                    "goes on and the run will be created when the server answers",
                    file=sys.stderr,
                )
        self._queue: queue.Queue[_Event | None] = queue.Queue()
        self._pending: list[_Event] = []
        self._rejected: list[tuple[_Event, str]] = []
        self._dropped = 0
        self._closing = False
        self._warned = False
        self._ok_since_failure = True
        self.failures = 0
        if run_id is not None:  # resuming: the run was ended (KILLED) by the interrupted process
            self._queue.put(_Event("status", {"status": "RUNNING"}))
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()

    def _create_run(self, cfg: TrackingConfig, workdir: Path | None) -> str:
        exp = self.client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:"):
                location = ((workdir or Path.cwd()).resolve() / DEFAULT_ARTIFACTS).as_uri()
            exp_id = self.client.create_experiment(cfg.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        tags = {"mlflow.runName": cfg.run_name} if cfg.run_name else None
        return self.client.create_run(exp_id, tags=tags).info.run_id

    # --- called by the training loop: never blocks, never raises -------------------------
    def log_params(self, params: dict) -> None:
        self._queue.put(_Event("params", {"params": {k: str(v)[:500] for k, v in params.items()}}))

    def set_tags(self, tags: dict) -> None:
        self._queue.put(_Event("tags", {"tags": {k: str(v) for k, v in tags.items()}}))

    def log_metrics(self, metrics: dict, step: int) -> None:
        stamp = int(time.time() * 1000)
        self._queue.put(
            _Event("metrics", {"metrics": {k: float(v) for k, v in metrics.items()}, "step": step, "ts": stamp})
        )

    def log_image(self, image: np.ndarray, path: str) -> None:
        self._queue.put(_Event("image", {"image": image, "path": path}))

    def log_artifact(self, local: str | Path, artifact_path: str | None = None) -> None:
        self._queue.put(_Event("artifact", {"local": str(local), "artifact_path": artifact_path}))

    def close(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        """Send what is left (retrying for up to `timeout` s while the server is away), then end the run."""
        timeout = self.close_timeout if timeout is None else timeout
        self._deadline = time.monotonic() + timeout
        self._queue.put(_Event("end", {"status": status}))
        self._queue.put(None)
        self._thread.join(timeout + 15)
        leftover = [(e, None) for e in self._pending + self._drain() if e.kind not in ("end", "status")]
        rejected = [(e, why) for e, why in self._rejected if e.kind not in ("end", "status")]
        if leftover or rejected or self._dropped:
            path = self.out_dir / "unsent_tracking.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as fh:
                for e, why in leftover + rejected:
                    payload = {k: v for k, v in e.payload.items() if k != "image"}
                    fh.write(json.dumps({"kind": e.kind, **payload, **({"error": why} if why else {})}) + "\n")
            gaps = [f"{len(leftover)} tracking event(s) could not reach {self.uri}"] if leftover else []
            gaps += [f"{len(rejected)} tracking event(s) were rejected by {self.uri}"] if rejected else []
            gaps += [f"{self._dropped} tracking event(s) were dropped"] if self._dropped else []
            print(f"warning: {'; '.join(gaps)}; they are in {path} (run {self.run_id})", file=sys.stderr)

    # --- the background thread ----------------------------------------------------------
    def _drain(self) -> list[_Event]:
        items = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items
            if item is None:
                self._closing = True
            else:
                items.append(item)

    def _work(self) -> None:
        while not self._closing or self._pending:
            try:
                item = self._queue.get(timeout=self.retry_seconds if self._pending else None)
                if item is None:
                    self._closing = True
                else:
                    self._pending.append(item)
                self._pending.extend(self._drain())
            except queue.Empty:
                pass
            if len(self._pending) > MAX_BUFFERED:
                extra = len(self._pending) - MAX_BUFFERED
                self._dropped += extra
                del self._pending[:extra]
            if self._flush():
                continue
            if self._closing and time.monotonic() >= self._deadline:
                return  # the server stayed away after training ended: close() saves the rest
            time.sleep(self.retry_seconds)

    def _flush(self) -> bool:
        """Send pending events in order; False when the server could not be reached."""
        while self._pending:
            event = self._pending[0]
            try:
                self._send(event)
            except Exception as exc:  # noqa: BLE001 - a failure other than a refusal means "try again later"
                if not _refused(exc, remote=self.uri.startswith(("http:", "https:"))):
                    self.failures += 1
                    if not self._warned or self._ok_since_failure:
                        print(
                            f"warning: MLflow tracking at {self.uri} is unreachable ({type(exc).__name__}); "
                            f"training goes on and logging will catch up when it is back",
                            file=sys.stderr,
                        )
                        self._warned = True
                        self._ok_since_failure = False
                    return False
                # the server answered, and would refuse this event again: set it aside, go on with the others
                self._rejected.append((event, f"{type(exc).__name__}: {exc}"))
                if len(self._rejected) == 1:
                    print(
                        f"warning: MLflow tracking at {self.uri} rejected a {event.kind} event ({exc}); "
                        f"training goes on; rejected events go to {self.out_dir / 'unsent_tracking.jsonl'}",
                        file=sys.stderr,
                    )
            self._pending.pop(0)
            if not self._ok_since_failure:
                print(f"note: MLflow tracking at {self.uri} is back; catching up", file=sys.stderr)
                self._ok_since_failure = True
        return True

    def _send(self, event: _Event) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if self.run_id is None:
            self.run_id = self._create_run(self._cfg, self._workdir)
        p = event.payload
        if event.kind == "params":
            items = [Param(k, v) for k, v in p["params"].items()]
            for start in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[start : start + 100])
        elif event.kind == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in p["tags"].items()])
        elif event.kind == "metrics":
            metrics = [Metric(k, v, p["ts"], p["step"]) for k, v in p["metrics"].items()]
            self.client.log_batch(self.run_id, metrics=metrics)
        elif event.kind == "image":
            self._log_image(p["image"], p["path"])
        elif event.kind == "artifact":
            self.client.log_artifact(self.run_id, p["local"], p["artifact_path"])
        elif event.kind == "end":
            self.client.set_terminated(self.run_id, status=p["status"])
        elif event.kind == "status":
            self.client.update_run(self.run_id, status=p["status"])

    def _log_image(self, image: np.ndarray, path: str) -> None:
        from PIL import Image

        folder, _, name = path.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            Image.fromarray(image).save(local)
            self.client.log_artifact(self.run_id, str(local), folder or None)
