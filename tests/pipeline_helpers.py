"""Shared set-up of the component and pipeline tests: tiny data, a tiny segmenter, params, a fake KFP server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from train_helpers import tiny_params


def tiny_data(root: Path) -> Path:
    from spade.data.synthetic import generate_builtin_dataset

    return generate_builtin_dataset(root, count=8, val_count=4, size=32, progress=False)


def tiny_segmenter(data: Path, out: Path) -> Path:
    from spade.evaluate.segmenters.small import train_small_segmenter

    if not out.is_file():
        train_small_segmenter(data, out, size=32, iterations=2, batch_size=4, progress=False)
    return out


def photos_folder(data: Path, out: Path) -> Path:
    """The data set's photos without labels, as train/ and val/ (an unlabeled collection)."""
    import shutil

    for split in ("train", "val"):
        (out / split).mkdir(parents=True, exist_ok=True)
        for photo in sorted((data / f"{split}_img").iterdir()):
            shutil.copy(photo, out / split / photo.name)
    return out


def pipeline_params(data: Path, work: Path) -> dict:
    params = tiny_params(
        data,
        work / "train-out",
        register={"store": str(work / "model-store")},
        tracking={"enabled": False, "tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "pipeline-test"},
        package={"name": "tiny", "batch_size": 2},
    )
    params["train"]["iterations"] = 2
    params["train"]["checkpoint_every"] = 2
    return params


class FakeKfpServer:
    """Kubeflow Pipelines' v2beta1 REST API, as far as kfp.Client uses it; records every request."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                url = urlparse(self.path)
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                owner.requests.append(
                    {"method": self.command, "path": url.path, "query": parse_qs(url.query), "body": body}
                )
                status, payload = owner.answer(self.command, url.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, method: str, path: str, body: object) -> tuple[int, dict]:
        base = "/apis/v2beta1"
        if path == f"{base}/healthz":
            return 200, {"multi_user": False}
        if path == f"{base}/experiments" and method == "GET":
            return 200, {"experiments": [], "total_size": 0}
        if path == f"{base}/experiments" and method == "POST":
            return 200, {"experiment_id": "exp-1", "display_name": (body or {}).get("display_name")}
        if path == f"{base}/runs" and method == "POST":
            return 200, {"run_id": "run-1", "display_name": (body or {}).get("display_name"), "state": "PENDING"}
        if path == f"{base}/recurringruns" and method == "POST":
            return 200, {"recurring_run_id": "rr-1", **(body or {})}
        return 404, {"error": f"not in the fake: {method} {path}"}

    def calls(self, method: str, path_end: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"].endswith(path_end)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
