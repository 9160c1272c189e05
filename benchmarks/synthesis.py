"""Synthesis benchmark: generator latency per image, throughput, peak memory and agreement with float32 eager.

For each configuration (the coco preset at 256x256 and a small 64x64 one; random
weights, with BatchNorm statistics from a few training-mode passes), each batch size
and each path (float32 / bfloat16, eager / fast), a fresh worker process loads the
model through `spade.synthesize.Synthesizer`, warms up, times several `synthesize`
calls and reports its peak memory and how far its images are from float32 eager on
the same inputs (max |difference| and PSNR on the 0..255 images). Label maps are the
COCO-Stuff sample's (../shared/data/coco_stuff_sample/val_label + val_inst, resized
nearest; the small model takes their class ids modulo its 8 classes) when it is
there, else blocky Voronoi maps. Prints a table and writes JSON with the machine
description. "fast" is the folded inference generator (spade.nn.inference), what
`spade synthesize`, serving and evaluation run by default; "eager" the reference.

    python benchmarks/synthesis.py                        # everything: about 10 min on 2 CPU cores
    python benchmarks/synthesis.py --quick                # batch 1, fewer repetitions: a few minutes
    python benchmarks/synthesis.py --configs small --paths float32-eager bfloat16-fast --batch-sizes 1 8
    python benchmarks/synthesis.py --device cuda --out benchmarks/results/synthesis-cuda.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

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

from spade.checkpoints import Checkpoint  # noqa: E402
from spade.config import (
    INFERENCE_PRECISIONS,  # noqa: E402
    ModelConfig,  # noqa: E402
)
from spade.labels import instance_edges, read_id_map, semantic_input  # noqa: E402
from spade.synthesize import Synthesizer, prepare_label, resize_ids, to_uint8  # noqa: E402
from spade.train.objective import GeneratorSide, init_weights  # noqa: E402

CONFIGS = {
    "small": dict(
        preset="custom", label_nc=8, crop_size=64, ngf=16, ndf=16, contain_dontcare_label=False, use_instance=False
    ),
    "coco": dict(preset="coco"),
}
PATHS = [f"{precision}-{mode}" for mode in ("eager", "fast") for precision in INFERENCE_PRECISIONS]
REFERENCE = "float32-eager"
OUT = "synthesis.json"
VORONOI_SEEDS = 20


def model_config(name: str) -> ModelConfig:
    spec = dict(CONFIGS[name])
    return ModelConfig.from_preset(spec.pop("preset"), **spec)


def sample_pairs(sample_dir: Path) -> list[tuple[Path, Path]]:
    """(label, instance) files of the sample's validation split; empty when it is not there."""
    labels = sorted((sample_dir / "val_label").glob("*.png"))
    return [(p, sample_dir / "val_inst" / p.name) for p in labels if (sample_dir / "val_inst" / p.name).is_file()]


def voronoi_regions(h: int, w: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) class ids and region ids: the Voronoi regions of VORONOI_SEEDS random points, random classes."""
    rng = np.random.default_rng(seed)
    points = rng.uniform((0, 0), (h, w), size=(VORONOI_SEEDS, 2))
    yy, xx = np.mgrid[0:h, 0:w]
    region = ((yy[..., None] - points[:, 0]) ** 2 + (xx[..., None] - points[:, 1]) ** 2).argmin(-1)
    return rng.integers(0, classes, VORONOI_SEEDS)[region], region


def voronoi_map(cfg: ModelConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A blocky (1, H, W) label map at the model's size and its instance map (`voronoi_regions`)."""
    label, region = voronoi_regions(*cfg.output_size, cfg.label_nc, seed)
    return torch.from_numpy(label)[None], torch.from_numpy(region)[None]


def label_maps(cfg: ModelConfig, batch: int, sample_dir: Path) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """`batch` label maps (N, 1, H, W) at the model's size, their instance maps (or None) and what they are."""
    pairs = sample_pairs(sample_dir)
    labels, instances = [], []
    if pairs:
        chosen = [pairs[i % len(pairs)] for i in range(batch)]
        for label_path, inst_path in chosen:
            if cfg.preset == "coco":
                item = prepare_label(cfg, label_path, inst_path)
                labels.append(item.label)
                instances.append(item.instance)
            else:  # another class count: fold COCO-Stuff's ids onto the model's classes, keeping the regions
                ids = read_id_map(label_path) % cfg.label_nc
                labels.append(torch.from_numpy(resize_ids(ids, cfg.output_size))[None])
                instances.append(torch.from_numpy(resize_ids(read_id_map(inst_path), cfg.output_size))[None])
        info = {
            "source": str(sample_dir),
            "files": [p.stem for p, _ in chosen],
            "class_ids": "as read" if cfg.preset == "coco" else f"modulo {cfg.label_nc}",
        }
    else:
        for i in range(batch):
            label, instance = voronoi_map(cfg, seed=i)
            labels.append(label)
            instances.append(instance)
        info = {"source": f"Voronoi maps of {VORONOI_SEEDS} random points, random classes", "seeds": list(range(batch))}
    label = torch.stack(labels)
    # the share of pixels with a 4-neighbour of another class
    info["boundary_fraction"] = round(instance_edges(label).float().mean().item(), 4)
    return label, torch.stack(instances) if cfg.use_instance else None, info


def random_checkpoint(cfg: ModelConfig, passes: int = 3) -> Checkpoint:
    """Random generator weights (seed 0), BatchNorm statistics averaged over training-mode passes on Voronoi maps.

    init_weights' small final convolution gives near-grey images (std ~0.01), on which
    precision differences would vanish in the 8-bit rounding; it is scaled so that the
    output before tanh has unit std, spanning the range as a trained model's does.
    """
    torch.manual_seed(0)
    gside = GeneratorSide(cfg)
    init_weights(gside)
    generator = gside.generator
    for m in generator.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a plain average over the passes
    with torch.no_grad():
        for p in range(passes + 1):
            maps = [voronoi_map(cfg, seed=1000 + 2 * p + i) for i in range(2)]
            label = torch.stack([m[0] for m in maps])
            instance = torch.stack([m[1] for m in maps]) if cfg.use_instance else None
            seg = semantic_input(label, cfg, instance)
            if p < passes:
                generator(seg)
        generator.eval()
        before_tanh = torch.atanh(generator(seg).clamp(-0.999, 0.999))
        generator.conv_img.weight.div_(before_tanh.std())
    state = {k: v.detach().clone() for k, v in generator.state_dict().items()}
    meta = {
        "source": f"random weights (seed 0), BatchNorm statistics from {passes} training-mode passes on Voronoi "
        "maps, final convolution scaled to unit std before tanh"
    }
    return Checkpoint(cfg, state, meta=meta)


def make_synthesizer(ckpt: Checkpoint, device: torch.device, path: str, channels_last: bool) -> Synthesizer:
    precision, mode = path.rsplit("-", 1)
    synth = Synthesizer(ckpt, device=str(device), precision=precision, fast=mode == "fast")
    if channels_last and mode == "eager":  # the fast path picks its own memory format
        synth.generator.to(memory_format=torch.channels_last)
    return synth


def agreement(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Max and mean |difference| and PSNR (dB; None when identical) of the 0..255 images, and the max
    |difference| of the [-1, 1] outputs before rounding."""
    a, b = to_uint8(out).astype(np.float64), to_uint8(ref).astype(np.float64)
    diff = np.abs(a - b)
    mse = float(np.mean(diff**2))
    return {
        "max_abs_diff_float": float((out - ref).abs().max()),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": round(float(diff.mean()), 4),
        "psnr_db": None if mse == 0 else round(10 * math.log10(255**2 / mse), 2),
    }


def worker(spec: dict) -> None:
    """One (configuration, batch, path) case: timings and peak memory first, then agreement with float32 eager."""
    device = torch.device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    start = time.perf_counter()  # a fresh process, as a serving worker starts: first-use imports count
    ckpt = Checkpoint.load(spec["checkpoint"])
    synth = make_synthesizer(ckpt, device, spec["path"], spec["channels_last"])
    load_s = time.perf_counter() - start
    label, instance, inputs = label_maps(ckpt.config, spec["batch"], Path(spec["sample_dir"]))
    label = label.to(device)
    instance = instance.to(device) if instance is not None else None
    memory = memory_after_setup()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats, _, out = time_calls(
        lambda: synth.synthesize(label, instance),
        device,
        warmup_s=spec["warmup_s"],
        budget_s=spec["budget_s"],
        min_reps=spec["min_reps"],
        max_reps=spec["max_reps"],
    )
    peak = peak_rss_mb()
    cuda_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

    ref_file = Path(spec["reference"])
    if ref_file.is_file():
        ref = torch.load(ref_file)
    else:
        if spec["path"] != REFERENCE:
            ref_synth = make_synthesizer(ckpt, device, REFERENCE, spec["channels_last"])
            out_ref = ref_synth.synthesize(label, instance)
        else:
            out_ref = out
        ref = out_ref.cpu()
        torch.save(ref, ref_file)
    batch = spec["batch"]
    result = {
        **{k: spec[k] for k in ("config", "batch", "path", "channels_last")},
        "threads": torch.get_num_threads(),
        "load_s": round(load_s, 3),
        **stats,
        "ms_per_image": 1000 * stats["median_s"] / batch,
        "throughput_img_s": batch / stats["median_s"],
        "peak_rss_mb": round(peak, 1),
        **memory,
        "cuda_peak_allocated_mb": None if cuda_peak is None else round(cuda_peak, 1),
        "output_std": round(float(out.std()), 4),
        "vs_float32_eager": agreement(out.cpu(), ref),
        "inputs": inputs,
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")


def table_row(r: dict) -> list[str]:
    case = [r["config"], str(r["batch"]), r["path"]]
    if "error" in r:
        return case + [r["error"]] + [""] * 9
    agree = r["vs_float32_eager"]
    if r["path"] == REFERENCE:
        psnr, maxdiff = "ref", "ref"
    else:
        psnr = "inf" if agree["psnr_db"] is None else f"{agree['psnr_db']:.1f}"
        maxdiff = f"{agree['max_abs_diff']:.0f}"
    memory = r["cuda_peak_allocated_mb"] if r["cuda_peak_allocated_mb"] is not None else r["peak_rss_mb"]
    return case + [
        f"{r['median_s']:.3f}",
        f"{r['min_s']:.3f}",
        f"{r['ms_per_image']:.1f}",
        f"{r['throughput_img_s']:.2f}",
        str(r["reps"]),
        f"{memory:.0f}",
        maxdiff,
        psnr,
        f"{r['inputs']['boundary_fraction']:.3f}",
        f"{r['load_s']:.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS, help="default: all")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="default 1 8 (1 with --quick)")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="eager generator weights in channels_last memory format (default: on with cuda, off on cpu)",
    )
    add_common_arguments(parser, unit="calls", budget="15, 3 with --quick", max_reps=50, out=OUT)
    args = parser.parse_args()
    if args._worker:
        worker(json.loads(args._worker))
        return
    settings = timing_settings(parser, args, budget=15.0, quick=3.0)
    batch_sizes = args.batch_sizes or ([1] if args.quick else [1, 8])
    if min(batch_sizes) < 1:
        parser.error("batch sizes must be >= 1")
    channels_last = args.device == "cuda" if args.channels_last is None else args.channels_last
    load = load_at_start()
    paths = [p for p in PATHS if p in args.paths]  # float32 eager first: it writes the reference

    configs, rows = [], []
    n_cases, done = len(args.configs) * len(batch_sizes) * len(paths), 0
    with tempfile.TemporaryDirectory(prefix="spade-bench-synthesis-") as tmp:
        work = Path(tmp)
        for name in args.configs:
            cfg = model_config(name)
            print(f"{name}: random weights, BatchNorm statistics ...", file=sys.stderr, flush=True)
            ckpt = random_checkpoint(cfg)
            ckpt_path = ckpt.save(work / f"{name}.pt")
            h, w = cfg.output_size
            configs.append({"config": name, "size": [w, h], "weights": ckpt.meta["source"], **cfg.to_dict()})
            for batch in batch_sizes:
                for path in paths:
                    case = {"config": name, "batch": batch, "path": path, "channels_last": channels_last}
                    spec = {
                        **case,
                        "device": args.device,
                        "checkpoint": str(ckpt_path),
                        "reference": str(work / f"reference-{name}-b{batch}.pt"),
                        "sample_dir": str(args.sample_dir),
                        **settings,
                    }
                    row = {**case, **run_worker(__file__, spec, work / f"result-{done}.json")}
                    rows.append(row)
                    done += 1
                    summary = row.get("error") or f"{row['median_s']:.3f} s per call, peak RSS {row['peak_rss_mb']} MB"
                    print(f"[{done}/{n_cases}] {name} batch {batch} {path}: {summary}", file=sys.stderr, flush=True)

    print()
    memory = "GPU MB" if args.device == "cuda" else "RSS MB"
    header = ["config", "batch", "path", "s/call", "min s", "ms/img", "img/s", "reps", memory, "max|d|", "PSNR dB"]
    print_table([*header, "boundary", "load s"], [table_row(r) for r in rows])
    print("max|d| and PSNR: against float32 eager on the same inputs, on the 0..255 images; load s: reading the")
    print("checkpoint and building the synthesizer in a fresh process, first-use imports included")

    out = {
        "benchmark": "synthesis",
        "machine": describe(),
        "load_average_at_start": load,
        "device": args.device,
        "channels_last": channels_last,
        "settings": settings,
        "configs": configs,
        "results": rows,
    }
    if args.device == "cuda":
        out["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    write_results(results_path(args, OUT), out)


if __name__ == "__main__":
    main()
