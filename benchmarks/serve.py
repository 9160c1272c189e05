"""Serving benchmark: p50 / p95 latency and throughput of a model behind a real TorchServe.

For each configuration (a small one and the coco preset at 256x256, random weights
unless --checkpoint is given) it packages the model with `spade package`, starts a
private TorchServe on 127.0.0.1, and sends label maps from several concurrent
clients. Prints a table and writes JSON with the machine description.

    python benchmarks/serve.py                                # small + coco, 1 and 4 clients
    python benchmarks/serve.py --configs small --clients 1 2 4 8 --requests 64
    python benchmarks/serve.py --checkpoint runs/demo/checkpoints/latest.pt --configs checkpoint
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import default_out, describe  # noqa: E402

from spade.checkpoints import Checkpoint  # noqa: E402
from spade.config import ModelConfig  # noqa: E402
from spade.nn.encoder import ConvEncoder  # noqa: E402
from spade.nn.generator import SPADEGenerator  # noqa: E402
from spade.serve.local_torchserve import LocalTorchServe  # noqa: E402
from spade.serve.package import ServingOptions, package  # noqa: E402

CONFIGS = {
    "small": dict(preset="custom", label_nc=8, crop_size=64, ngf=16),
    "coco": dict(preset="coco"),
}


def random_checkpoint(spec: dict) -> Checkpoint:
    torch.manual_seed(0)
    spec = dict(spec)
    cfg = ModelConfig.from_preset(spec.pop("preset"), **spec)
    enc = ConvEncoder.from_config(cfg).state_dict() if cfg.use_vae else None
    return Checkpoint(cfg, SPADEGenerator.from_config(cfg).state_dict(), enc, meta={"source": "random weights"})


def label_png(cfg: ModelConfig, seed: int) -> bytes:
    """A blocky label map of the model's size with valid class values."""
    rng = np.random.default_rng(seed)
    h, w = cfg.output_size
    cells = rng.integers(0, cfg.label_nc, (h // 16 + 1, w // 16 + 1)) - cfg.label_offset
    ids = np.repeat(np.repeat(cells, 16, 0), 16, 1)[:h, :w].astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(ids).save(buf, format="PNG")
    return buf.getvalue()


def run_clients(url: str, headers: dict, bodies: list[bytes], clients: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    errors = 0

    def one(body: bytes) -> None:
        nonlocal errors
        req = urllib.request.Request(url, data=body, method="POST", headers=headers)
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=600) as resp:
                resp.read()
                ok = resp.status == 200
        except OSError:
            ok = False
        dt = time.perf_counter() - t0
        with lock:
            latencies.append(dt)
            errors += not ok

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, bodies))
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(bodies),
        "errors": errors,
        "p50_s": statistics.median(lat),
        "p95_s": lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))],
        "mean_s": statistics.fmean(lat),
        "throughput_img_s": len(bodies) / wall,
        "wall_s": wall,
    }


def bench_config(name: str, ckpt: Checkpoint, args: argparse.Namespace, work: Path) -> dict:
    ckpt_path = work / f"{name}.pt"
    ckpt.save(ckpt_path)
    options = ServingOptions(
        batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay, precision=args.precision, max_batch=8
    )
    result = package(ckpt_path, name=name, version="1", out=work / f"dist-{name}", options=options, force=True)
    rows = []
    with LocalTorchServe(result.mar.parent, models=[f"{name}={name}.mar"], workdir=work / f"ts-{name}") as ts:
        url = f"{ts.inference_url}/predictions/{name}"
        headers = {**ts.headers(), "Content-Type": "image/png"}
        bodies = [label_png(ckpt.config, i) for i in range(args.requests)]
        run_clients(url, headers, bodies[: max(2, args.warmup)], 1)  # warm-up: first-call allocations
        for clients in args.clients:
            row = run_clients(url, headers, bodies, clients)
            rows.append(row)
            print(
                f"{name:>10} {clients:>7} {row['requests']:>8} {row['p50_s']:>8.3f} {row['p95_s']:>8.3f} "
                f"{row['throughput_img_s']:>9.2f} {row['errors']:>6}",
                flush=True,
            )
    h, w = ckpt.config.output_size
    return {
        "config": name,
        "preset": ckpt.config.preset,
        "size": [w, h],
        "precision": args.precision,
        "batch_size": args.batch_size,
        "max_batch_delay_ms": args.max_batch_delay,
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["small", "coco"], help="small, coco, checkpoint")
    parser.add_argument("--checkpoint", type=Path, help="a real checkpoint for the 'checkpoint' configuration")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4], help="concurrent clients (default 1 4)")
    parser.add_argument("--requests", type=int, default=16, help="requests per client level")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="TorchServe batch size")
    parser.add_argument("--max-batch-delay", type=int, default=20, help="ms")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument(
        "--out", type=Path, help="results file (default: benchmarks/results/<kind of machine>/serve.json)"
    )
    args = parser.parse_args()
    args.out = args.out or default_out("serve.json")

    print(f"{'config':>10} {'clients':>7} {'requests':>8} {'p50 s':>8} {'p95 s':>8} {'img/s':>9} {'errors':>6}")
    records = []
    with tempfile.TemporaryDirectory(prefix="spade-bench-serve-") as tmp:
        for name in args.configs:
            if name == "checkpoint":
                if args.checkpoint is None:
                    parser.error("--configs checkpoint needs --checkpoint PATH")
                ckpt = Checkpoint.load(args.checkpoint)
            elif name in CONFIGS:
                ckpt = random_checkpoint(CONFIGS[name])
            else:
                parser.error(f"unknown configuration {name!r}; choose from small, coco, checkpoint")
            records.append(bench_config(name, ckpt, args, Path(tmp)))
    out = {"benchmark": "serve", "machine": describe(), "configs": records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
