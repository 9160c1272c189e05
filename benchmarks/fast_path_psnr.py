"""How far the fast paths' images are from float32 eager on a trained model's own validation maps.

For a checkpoint (by default the latest `make demo` model) and a folder of its label maps (by
default the built-in landscapes' val_label), every label map is synthesized by float32 eager (the
reference), bfloat16 eager (autocast), float32 fast and bfloat16 fast (spade.nn.inference), and
each image's PSNR from the reference is computed on the 0..255 images. Reports, per path, the
lowest, median and mean PSNR and the largest |difference|; prints a table and writes JSON with the
machine description (benchmarks/results/<kind of machine>/fast_path_psnr.json), which the README's
speed tables read.

    python benchmarks/fast_path_psnr.py                                    # the demo model, data/builtin
    python benchmarks/fast_path_psnr.py --checkpoint runs/demo/final.pt --labels data/builtin/val_label
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table, write_results  # noqa: E402
from machine import default_out, describe  # noqa: E402

from spade.checkpoints import Checkpoint  # noqa: E402
from spade.data.suffixes import IMAGE_SUFFIXES  # noqa: E402
from spade.errors import SpadeError  # noqa: E402
from spade.synthesize import Synthesizer, prepare_label, to_uint8  # noqa: E402

PATHS = ("float32-eager", "bfloat16-eager", "float32-fast", "bfloat16-fast")
OUT = "fast_path_psnr.json"


def latest_demo_checkpoint(pipeline_root: Path = Path("runs/pipeline")) -> Path | None:
    """final.pt of the newest `make demo` pipeline run."""
    runs = sorted(pipeline_root.glob("*/train/model/final.pt"))
    return runs[-1] if runs else None


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when identical)."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="project checkpoint (default: the latest demo model)")
    parser.add_argument("--labels", type=Path, default=Path("data/builtin/val_label"), help="label-map folder")
    parser.add_argument("--out", type=Path, help=f"results file (default: benchmarks/results/<kind>/{OUT})")
    args = parser.parse_args()
    checkpoint = args.checkpoint or latest_demo_checkpoint()
    if checkpoint is None or not checkpoint.is_file():
        parser.error(f"no checkpoint {checkpoint or 'under runs/pipeline/*/train/model/'}: run `make demo` or pass one")
    files = (
        sorted(p for p in args.labels.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if args.labels.is_dir() else []
    )
    if not files:
        parser.error(f"no label maps in {args.labels}")
    ckpt = Checkpoint.load(checkpoint)
    try:
        inputs = [prepare_label(ckpt.config, f) for f in files]
    except SpadeError as exc:
        parser.error(str(exc))

    images: dict[str, list[np.ndarray]] = {}
    for path in PATHS:
        precision, mode = path.rsplit("-", 1)
        synth = Synthesizer(ckpt, precision=precision, fast=mode == "fast")
        with torch.no_grad():
            images[path] = [to_uint8(synth.synthesize_inputs([i]))[0] for i in inputs]

    results, rows = [], []
    for path in PATHS:
        pairs = list(zip(images[path], images["float32-eager"], strict=True))
        values = [psnr(a, b) for a, b in pairs]
        worst = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in pairs)
        finite = [v for v in values if math.isfinite(v)]
        record = {
            "path": path,
            "min_psnr_db": round(min(values), 2) if finite else None,
            "median_psnr_db": round(statistics.median(values), 2) if finite else None,
            "mean_psnr_db": round(statistics.fmean(finite), 2) if finite else None,
            "identical_images": len(values) - len(finite),
            "max_abs_diff": worst,
        }
        results.append(record)
        show = "reference" if path == "float32-eager" else None
        rows.append(
            [path]
            + [show or ("inf" if record[k] is None else f"{record[k]:.1f}") for k in ("min_psnr_db", "median_psnr_db")]
            + [str(worst)]
        )
    print(f"{len(files)} label maps of {args.labels}, model {checkpoint}")
    print_table(["path", "min PSNR dB", "median PSNR dB", "max |diff|"], rows)
    out = {
        "benchmark": "fast_path_psnr",
        "machine": describe(),
        "checkpoint": str(checkpoint),
        "model": ckpt.config.to_dict(),
        "data": {
            "what": f"{'demo model' if args.checkpoint is None else checkpoint.name}, "
            f"{ckpt.config.output_size[0]}px, {len(files)} label maps",
            "labels": str(args.labels),
        },
        "results": results,
    }
    write_results(args.out or default_out(OUT), out)


if __name__ == "__main__":
    main()
