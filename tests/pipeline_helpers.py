"""Shared set-up of the component and pipeline tests: tiny data, a tiny segmenter, params, a fake KFP server."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from http_helpers import FakeServer, reply
from train_helpers import tiny_params


def tiny_data(root: Path) -> Path:
    from spade.data.synthetic import generate_builtin_dataset

    return generate_builtin_dataset(root, count=8, val_count=4, size=32, progress=False)


def tiny_segmenter(data: Path, out: Path) -> Path:
    from spade.evaluate.segmenters.small import train_small_segmenter

    if not out.is_file():
        train_small_segmenter(data, out, size=32, iterations=2, batch_size=4, progress=False)
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


class FakeKfpServer(FakeServer):
    """Kubeflow Pipelines' v2beta1 REST API, as far as kfp.Client uses it; records every request."""

    def __init__(self) -> None:
        self.requests: list[dict] = []

    @property
    def host(self) -> str:
        return self.base

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        url = urlparse(h.path)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        self.requests.append({"method": h.command, "path": url.path, "query": parse_qs(url.query), "body": body})
        reply(h, *self.answer(h.command, url.path, body))

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
