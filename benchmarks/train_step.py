"""Training benchmark: seconds per iteration (a generator step, then a discriminator step) and images/s.

Each iteration is `spade.train.objective.TrainStep`, what `spade train` runs, set up
as spade/train/loop.py does: GeneratorSide and MultiscaleDiscriminator with
init_weights, Adam with the TTUR learning rates and betas, hinge + feature matching
+ VGG losses (the VGG19 has random weights: the same cost as the real ones), inputs
through `Objective.inputs`. Configurations: the coco preset at 256x256 and a small
64x64 one. Every (configuration, precision, batch, channels_last) case runs in a
fresh worker process, for its own peak memory; the losses of its first iteration
are reported so that float32 and bfloat16 can be compared (same seed, same inputs).
Label maps and photos are the COCO-Stuff sample's (../shared/data/coco_stuff_sample:
val_label, val_inst, val_img) when it is there, else Voronoi maps and random images.
Prints a table and writes JSON with the machine description.

    python benchmarks/train_step.py                       # small batch 1 and 8, coco batch 1: about 10 min on 2 cores
    python benchmarks/train_step.py --quick               # fewer iterations: a few minutes
    python benchmarks/train_step.py --configs coco --precisions bfloat16 --channels-last both
    python benchmarks/train_step.py --configs coco --coco-batch-sizes 1 8
    python benchmarks/train_step.py --device cuda --precisions float32 bfloat16 float16 --channels-last on
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    add_common_arguments,
    load_at_start,
    memory_after_setup,
    peak_rss_mb,
    print_table,
    results_path,
    run_worker,
    time_calls,
    timing_settings,
    write_results,
)
from machine import describe  # noqa: E402
from synthesis import CONFIGS, label_maps, model_config  # noqa: E402

from spade.config import ModelConfig, TrainConfig  # noqa: E402
from spade.synthesize import read_rgb  # noqa: E402
from spade.train.objective import step_for_timing  # noqa: E402

LOSSES = ("G_GAN", "G_feat", "G_VGG", "D_real", "D_fake")
PRECISIONS = ("float32", "bfloat16", "float16")
OUT = "train_step.json"


def real_images(cfg: ModelConfig, inputs: dict, batch: int, sample_dir: Path) -> tuple[torch.Tensor, str]:
    """The photos of the sample's label maps (N, 3, H, W) in [-1, 1], else uniform noise; and what they are."""
    if "files" in inputs:
        photos = [read_rgb(sample_dir / "val_img" / f"{stem}.jpg", cfg.output_size) for stem in inputs["files"]]
        return torch.stack(photos), "the label maps' photos (val_img)"
    h, w = cfg.output_size
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1, "uniform noise"


def train_settings() -> dict:
    """The optimisation settings every case uses (TrainConfig's defaults)."""
    tc = TrainConfig()
    keys = ("gan_mode", "lambda_feat", "lambda_vgg", "feat_loss", "vgg_loss", "d_steps_per_g", "init_gain", "seed")
    return {"lr_G": tc.lr_G, "lr_D": tc.lr_D, "betas": tc.betas, **{k: getattr(tc, k) for k in keys}}


def worker(spec: dict) -> None:
    """One (configuration, precision, batch, channels_last) case: warm-up iteration, timed iterations, peak memory."""
    device = torch.device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cfg = model_config(spec["config"])
    tc = TrainConfig(batch_size=spec["batch"], precision=spec["precision"], channels_last=spec["channels_last"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sample_dir = Path(spec["sample_dir"])
    label, instance, inputs = label_maps(cfg, tc.batch_size, sample_dir)
    image, inputs["images"] = real_images(cfg, inputs, tc.batch_size, sample_dir)
    batch = {"label": label, "image": image} | ({"instance": instance} if instance is not None else {})

    torch.manual_seed(tc.seed)
    step = step_for_timing(cfg, tc, device)  # as `spade train` sets it up, with its numerics
    memory = memory_after_setup()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    iteration = 0

    def one_iteration() -> dict[str, float]:
        nonlocal iteration
        logged = step(batch, iteration)
        iteration += 1
        return {k: float(v) for k, v in logged.items()}  # the trainer reads every loss, as here

    stats, first_losses, _ = time_calls(
        one_iteration,
        device,
        warmup_s=spec["warmup_s"],
        budget_s=spec["budget_s"],
        min_reps=spec["min_reps"],
        max_reps=spec["max_reps"],
    )
    cuda_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    result = {
        **{k: spec[k] for k in ("config", "batch", "precision")},
        "channels_last": step.channels_last,  # what applied: float32 stays NCHW
        "threads": torch.get_num_threads(),
        **stats,
        "images_per_s": tc.batch_size / stats["median_s"],
        "first_iteration_losses": first_losses,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **memory,
        "cuda_peak_allocated_mb": None if cuda_peak is None else round(cuda_peak, 1),
        "inputs": inputs,
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")


def table_row(r: dict) -> list[str]:
    case = [r["config"], str(r["batch"]), r["precision"], "on" if r["channels_last"] else "off"]
    if "error" in r:
        return case + [r["error"]] + [""] * (5 + len(LOSSES))
    memory = r["cuda_peak_allocated_mb"] if r["cuda_peak_allocated_mb"] is not None else r["peak_rss_mb"]
    losses = r["first_iteration_losses"]
    return case + [
        f"{r['median_s']:.3f}",
        f"{r['min_s']:.3f}",
        f"{r['images_per_s']:.2f}",
        str(r["reps"]),
        f"{memory:.0f}",
        *(f"{losses[k]:.4f}" if k in losses else "-" for k in LOSSES),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"], choices=PRECISIONS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], help="of the small configuration")
    parser.add_argument("--coco-batch-sizes", nargs="+", type=int, default=[1], help="of coco (8: add minutes)")
    parser.add_argument(
        "--channels-last", default="off", choices=("off", "on", "both"), help="with bf16 / fp16 (float32 stays NCHW)"
    )
    add_common_arguments(parser, unit="iterations", budget="60, 5 with --quick", max_reps=30, out=OUT)
    args = parser.parse_args()
    if args._worker:
        worker(json.loads(args._worker))
        return
    settings = timing_settings(parser, args, budget=60.0, quick=5.0)
    if min(args.batch_sizes + args.coco_batch_sizes) < 1:
        parser.error("batch sizes must be >= 1")
    if args.device == "cpu" and "float16" in args.precisions:
        parser.error("float16 training needs CUDA; on CPU use bfloat16 or float32")
    load = load_at_start()
    layouts = {"off": [False], "on": [True], "both": [False, True]}[args.channels_last]
    cases = [
        {"config": name, "batch": batch, "precision": precision, "channels_last": channels_last}
        for name in args.configs
        for batch in (args.coco_batch_sizes if name == "coco" else args.batch_sizes)
        for precision in args.precisions
        for channels_last in layouts
        if not (channels_last and precision == "float32")  # float32 trains NCHW whatever the setting
    ]

    rows = []
    with tempfile.TemporaryDirectory(prefix="spade-bench-train-") as tmp:
        for i, case in enumerate(cases):
            spec = {**case, "device": args.device, "sample_dir": str(args.sample_dir), **settings}
            row = {**case, **run_worker(__file__, spec, Path(tmp) / f"result-{i}.json")}
            rows.append(row)
            summary = row.get("error") or f"{row['median_s']:.3f} s per iteration, peak RSS {row['peak_rss_mb']} MB"
            label = " ".join(f"{k}={v}" for k, v in case.items())
            print(f"[{i + 1}/{len(cases)}] {label}: {summary}", file=sys.stderr, flush=True)

    print()
    memory = "GPU MB" if args.device == "cuda" else "RSS MB"
    header = ["config", "batch", "precision", "ch_last", "s/iter", "min s", "img/s", "reps", memory, *LOSSES]
    print_table(header, [table_row(r) for r in rows])
    print("losses: of the first iteration (same seed and inputs for every precision)")

    out = {
        "benchmark": "train_step",
        "machine": describe(),
        "load_average_at_start": load,
        "device": args.device,
        "settings": settings,
        "configs": {name: model_config(name).to_dict() for name in args.configs},
        "train_settings": train_settings(),
        "results": rows,
    }
    write_results(results_path(args, OUT), out)


if __name__ == "__main__":
    main()
