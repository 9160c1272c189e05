"""`spade package`: a checkpoint -> a TorchServe model archive (.mar) and the KServe storage layout.

The archive holds a serving copy of the checkpoint (generator, encoder, config and
lineage; no discriminator or optimiser state), a two-line handler over
`spade.serve.handler.SpadeHandler`, and a model-config YAML with TorchServe's
batching settings and ours (precision, pixel limit). The KServe layout is what an
InferenceService's storageUri points at: ``config/config.properties`` and
``model-store/NAME.mar``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from spade.config import INFERENCE_PRECISIONS, add_precision_argument
from spade.errors import SpadeError

SERIALIZED_NAME = "spade_model.pt"
HANDLER_NAME = "spade_handler.py"
HANDLER_SOURCE = '''"""TorchServe entry point for a SPADE model archive (written by `spade package`)."""

from spade.serve.handler import SpadeHandler


class SpadeModelHandler(SpadeHandler):
    """The archive's handler: all behaviour lives in spade.serve.handler.SpadeHandler."""
'''
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
VERSION_PATTERN = re.compile(r"[0-9A-Za-z][0-9A-Za-z_.-]*")

EXAMPLES = """examples:
  spade package --checkpoint runs/demo/checkpoints/latest.pt --name landscapes --version 1 --out dist/
  spade package --checkpoint coco.pt --name coco --version 2.0 --out dist/ --batch-size 4 --max-batch-delay 50
  # then: torchserve --start --model-store dist/ --models landscapes=landscapes.mar
  #   or: point a KServe InferenceService's storageUri at dist/kserve/ (config/ + model-store/)
"""


@dataclass(frozen=True)
class ServingOptions:
    """TorchServe's per-model settings and the handler's own."""

    batch_size: int = 4
    max_batch_delay_ms: int = 50
    workers: int = 1
    response_timeout_s: int = 300
    precision: str = "auto"
    max_pixels: int = 4096 * 4096
    max_batch: int = 8

    def __post_init__(self) -> None:
        if self.precision not in ("auto", *INFERENCE_PRECISIONS):
            raise SpadeError(f"precision must be auto, {', '.join(INFERENCE_PRECISIONS)}; got {self.precision!r}")
        for name in ("batch_size", "workers", "response_timeout_s", "max_pixels", "max_batch"):
            if getattr(self, name) < 1:
                raise SpadeError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_batch_delay_ms < 0:
            raise SpadeError(f"max_batch_delay_ms must be >= 0, got {self.max_batch_delay_ms}")

    def model_config(self) -> dict:
        """The archive's model-config YAML (TorchServe reads the camelCase keys, our handler `handler:`)."""
        return {
            "minWorkers": self.workers,
            "maxWorkers": self.workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
            "handler": {"precision": self.precision, "max_pixels": self.max_pixels, "max_batch": self.max_batch},
        }


@dataclass(frozen=True)
class PackageResult:
    mar: Path
    kserve_root: Path
    config_properties: Path
    name: str
    version: str

    def to_dict(self) -> dict:
        return {k: str(v) for k, v in self.__dict__.items()}


def kserve_config_properties(name: str, version: str, options: ServingOptions, *, port: int = 8080) -> str:
    """TorchServe settings for the KServe custom predictor: the storage mounted at /mnt/models."""
    snapshot = {
        "name": "startup.cfg",
        "modelCount": 1,
        "models": {
            name: {
                version: {
                    "defaultVersion": True,
                    "marName": f"{name}.mar",
                    "minWorkers": options.workers,
                    "maxWorkers": options.workers,
                    "batchSize": options.batch_size,
                    "maxBatchDelay": options.max_batch_delay_ms,
                    "responseTimeout": options.response_timeout_s,
                }
            }
        },
    }
    lines = [
        "# TorchServe inside a KServe InferenceService (custom predictor container); written by spade package.",
        "# KServe mounts the storageUri at /mnt/models; clients call /v1/models/<name>:predict on this port.",
        "# The management API answers on the pod's loopback only (no key needed there, none reachable from",
        "# outside): `spade deploy --torchserve-url http://127.0.0.1:PORT` from inside the pod swaps versions.",
        f"inference_address=http://0.0.0.0:{port}",
        f"management_address=http://127.0.0.1:{port + 1}",
        f"metrics_address=http://0.0.0.0:{port + 2}",
        "enable_metrics_api=true",
        "metrics_mode=prometheus",
        "number_of_netty_threads=4",
        "job_queue_size=32",
        "enable_envvars_config=true",
        "install_py_dep_per_model=false",
        "default_response_timeout=300",
        "model_store=/mnt/models/model-store",
        # the inference API is authenticated by the cluster's network policy and gateway (KServe's clients send
        # no TorchServe key); the management API is not reachable from outside the pod
        "disable_token_authorization=true",
        "enable_model_api=true",
        f"model_snapshot={json.dumps(snapshot, separators=(',', ':'))}",
    ]
    return "\n".join(lines) + "\n"


def _archiver() -> list[str]:
    exe = Path(sys.executable).with_name("torch-model-archiver")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("torch-model-archiver")
    if found:
        return [found]
    try:
        import model_archiver  # noqa: F401
    except ImportError:
        raise SpadeError(
            "torch-model-archiver is not installed; install it with: pip install torch-model-archiver"
        ) from None
    return [sys.executable, "-m", "model_archiver.model_packaging"]


def package(
    checkpoint: str | Path,
    *,
    name: str,
    version: str,
    out: str | Path,
    options: ServingOptions | None = None,
    force: bool = False,
) -> PackageResult:
    """Build OUT/NAME.mar and OUT/kserve/{config/config.properties, model-store/NAME.mar}."""
    from spade.checkpoints import Checkpoint

    options = options or ServingOptions()
    if not NAME_PATTERN.fullmatch(name):
        raise SpadeError(f"model name {name!r} must be letters, digits, '_', '-' or '.', starting with a letter/digit")
    if not VERSION_PATTERN.fullmatch(str(version)):
        raise SpadeError(f"version {version!r} must be letters, digits, '_', '-' or '.' (e.g. 1, 1.0, 2026-11-21)")
    version = str(version)
    out = Path(out)
    mar = out / f"{name}.mar"
    kserve_root = out / "kserve"
    if mar.exists() and not force:
        raise SpadeError(f"{mar} already exists; pass --force to overwrite it")
    ckpt = Checkpoint.load(checkpoint)
    serving = Checkpoint(config=ckpt.config, generator=ckpt.generator, encoder=ckpt.encoder, meta=dict(ckpt.meta))
    serving.meta.setdefault("source_checkpoint", str(Path(checkpoint).resolve()))

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".package-", dir=out) as tmp:
        work = Path(tmp)
        serving.save(work / SERIALIZED_NAME)
        (work / HANDLER_NAME).write_text(HANDLER_SOURCE)
        (work / "model-config.yaml").write_text(yaml.safe_dump(options.model_config(), sort_keys=False))
        export = work / "export"
        export.mkdir()
        cmd = [
            *_archiver(),
            "--model-name", name,
            "--version", version,
            "--serialized-file", str(work / SERIALIZED_NAME),
            "--handler", str(work / HANDLER_NAME),
            "--config-file", str(work / "model-config.yaml"),
            "--archive-format", "zip-store",  # weights do not compress; storing is much faster
            "--export-path", str(export),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        built = export / f"{name}.mar"
        if proc.returncode != 0 or not built.is_file():
            raise SpadeError(f"torch-model-archiver failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")

        staged_kserve = work / "kserve"
        (staged_kserve / "config").mkdir(parents=True)
        (staged_kserve / "model-store").mkdir()
        (staged_kserve / "config" / "config.properties").write_text(kserve_config_properties(name, version, options))
        try:
            os.link(built, staged_kserve / "model-store" / f"{name}.mar")
        except OSError:
            shutil.copy2(built, staged_kserve / "model-store" / f"{name}.mar")
        os.replace(built, mar)
        if kserve_root.exists():
            shutil.rmtree(kserve_root)
        os.replace(staged_kserve, kserve_root)
    return PackageResult(mar, kserve_root, kserve_root / "config" / "config.properties", name, version)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, type=Path, help="project checkpoint (training or convert-official)")
    p.add_argument("--name", required=True, help="model name (the TorchServe / KServe endpoint name)")
    p.add_argument("--version", required=True, help="model version, e.g. 1 or 1.0")
    p.add_argument("--out", required=True, type=Path, help="output directory for NAME.mar and kserve/")
    p.add_argument("--batch-size", type=int, default=4, help="TorchServe batch size (default 4)")
    p.add_argument("--max-batch-delay", type=int, default=50, help="ms TorchServe waits to fill a batch (default 50)")
    p.add_argument("--workers", type=int, default=1, help="workers per model (default 1)")
    p.add_argument("--response-timeout", type=int, default=300, help="seconds per batch before TorchServe gives up")
    add_precision_argument(p, what="the handler's precision: ")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest image in a request, in pixels")
    p.add_argument("--max-batch", type=int, default=8, help="images per forward pass in the handler")
    p.add_argument("--force", action="store_true", help="overwrite an existing NAME.mar")


def main(args: argparse.Namespace) -> None:
    options = ServingOptions(
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay,
        workers=args.workers,
        response_timeout_s=args.response_timeout,
        precision=args.precision,
        max_pixels=args.max_pixels,
        max_batch=args.max_batch,
    )
    result = package(
        args.checkpoint, name=args.name, version=args.version, out=args.out, options=options, force=args.force
    )
    size_mb = result.mar.stat().st_size / 2**20
    print(f"wrote {result.mar} ({size_mb:.1f} MiB, version {result.version})")
    print(f"wrote {result.kserve_root}/ (config/config.properties + model-store/{result.name}.mar) for KServe")
