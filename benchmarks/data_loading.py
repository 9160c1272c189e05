"""Data-loading benchmark: what reading one training sample costs, and whether the loader keeps up.

Reads the coco preset's training samples (256x256 crops of 286x286 resizes, random flips,
instance maps) the way `spade train` does: `SegmentationDataset` behind `SeededSamples`
and the run-long `BatchStream`, through the trainer's own `training_loader`.
The files are the COCO-Stuff sample's training split (../shared/data/coco_stuff_sample,
photos of about 640x480) repeated under new names up to --samples, else generated
640x480 photos and label maps of the same kind.

It reports
- the cost of each step for one sample in one process (one torch thread): label map,
  instance map, photo decode, the geometric transforms, the float conversion;
- loader throughput (samples/s) and the wait for the first batch (worker start-up) for
  each worker count and batch size;
- one DataLoader per epoch (the trainer before) against one for the whole run (now),
  over several epochs of a small dataset with workers: the start-up paid at every epoch;
- what the trainer consumes on this machine, read from benchmarks/results/<kind of machine>/train_step.json
  (samples per second at the coco preset) when that file is there.

Prints a table and writes JSON with the machine description.

    python benchmarks/data_loading.py                          # about a minute on 2 cores
    python benchmarks/data_loading.py --workers 0 1 2 4 --batch-sizes 1 8 32 --samples 256
    python benchmarks/data_loading.py --quick --out /tmp/loading.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import SAMPLE_DIR, load_at_start, print_table, write_results  # noqa: E402
from machine import default_out, describe  # noqa: E402
from synthesis import voronoi_regions  # noqa: E402

from spade.config import DataConfig, ModelConfig  # noqa: E402
from spade.data.dataset import SegmentationDataset, build_dataset, read_photo  # noqa: E402
from spade.data.transforms import plan, transform_ids, transform_image  # noqa: E402
from spade.devices import usable_cpus  # noqa: E402
from spade.labels import read_id_map, to_class_ids  # noqa: E402
from spade.train.distributed import BatchStream, DistInfo, GlobalBatchSampler  # noqa: E402
from spade.train.loop import training_loader  # noqa: E402

OUT = "data_loading.json"
STEPS = ("label map", "instance map", "photo decode", "label geometry", "photo geometry", "to float")
GENERATED_SIZE = (640, 480)
CPU = torch.device("cpu")


def build_folder(root: Path, samples: int, sample_dir: Path) -> str:
    """`samples` training samples in the custom layout under root; what they are made of."""
    for side in ("train_img", "train_label", "train_inst"):
        (root / side).mkdir(parents=True)
    stems = sorted(p.stem for p in (sample_dir / "train_label").glob("*.png")) if sample_dir.is_dir() else []
    stems = [s for s in stems if (sample_dir / "train_img" / f"{s}.jpg").is_file()]
    stems = [s for s in stems if (sample_dir / "train_inst" / f"{s}.png").is_file()]
    if stems:
        for i, stem in zip(range(samples), itertools.cycle(stems), strict=False):
            name = f"{i:05d}_{stem}"
            (root / "train_img" / f"{name}.jpg").symlink_to(sample_dir / "train_img" / f"{stem}.jpg")
            (root / "train_label" / f"{name}.png").symlink_to(sample_dir / "train_label" / f"{stem}.png")
            (root / "train_inst" / f"{name}.png").symlink_to(sample_dir / "train_inst" / f"{stem}.png")
        return f"the COCO-Stuff sample's {len(stems)} training samples ({sample_dir}), repeated"
    rng = np.random.default_rng(0)
    w, h = GENERATED_SIZE
    for i in range(samples):
        label, region = voronoi_regions(h, w, 182, seed=i)
        Image.fromarray(label.astype(np.uint8)).save(root / "train_label" / f"{i:05d}.png")
        Image.fromarray(region.astype(np.uint8)).save(root / "train_inst" / f"{i:05d}.png")
        photo = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(photo).resize((w, h), Image.Resampling.BICUBIC).save(
            root / "train_img" / f"{i:05d}.jpg", quality=90
        )
    return f"generated {w}x{h} JPEG photos with Voronoi label and instance maps"


def step_costs(dataset: SegmentationDataset, passes: int) -> dict:
    """Median milliseconds of each step of `SegmentationDataset.__getitem__`, one sample at a time."""
    cfg, dc = dataset.model_cfg, dataset.data_cfg
    times: dict[str, list[float]] = {k: [] for k in (*STEPS, "total")}
    for _ in range(passes):
        for sample in dataset.samples:
            t = [time.perf_counter()]
            ids = to_class_ids(read_id_map(sample.label, "label map"), cfg, source=str(sample.label))
            t.append(time.perf_counter())
            inst = read_id_map(sample.instance, "instance map")
            t.append(time.perf_counter())
            photo = read_photo(sample.image)
            t.append(time.perf_counter())
            geo = plan((ids.shape[1], ids.shape[0]), cfg, dc, train=True)
            transform_ids(ids, geo), transform_ids(inst, geo)
            t.append(time.perf_counter())
            rgb = torch.from_numpy(transform_image(photo, geo)).permute(2, 0, 1)
            t.append(time.perf_counter())
            rgb.to(torch.float32).div_(127.5).sub_(1.0).contiguous()
            t.append(time.perf_counter())
            for name, a, b in zip(STEPS, t, t[1:], strict=False):
                times[name].append(b - a)
            times["total"].append(t[-1] - t[0])
    return {k: round(1000 * statistics.median(v), 3) for k, v in times.items()}


def throughput(dataset: SegmentationDataset, workers: int, batch: int, batches: int) -> dict:
    """Samples/s over `batches` batches after the first, and the wait for the first (worker start-up)."""
    stream = BatchStream(len(dataset), batch, info=DistInfo(), seed=0, epoch=0)
    t0 = time.perf_counter()
    batches_iter = iter(training_loader(dataset, stream, workers, CPU))
    next(batches_iter)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(batches):
        next(batches_iter)
    elapsed = time.perf_counter() - t1
    del batches_iter
    return {
        "workers": workers,
        "batch": batch,
        "batches_timed": batches,
        "first_batch_s": round(first, 4),
        "samples_per_s": round(batches * batch / elapsed, 1),
        "ms_per_sample": round(1000 * elapsed / (batches * batch), 3),
    }


def epochs_compared(dataset: SegmentationDataset, workers: int, batch: int, epochs: int) -> dict:
    """Seconds to read `epochs` epochs with one DataLoader per epoch (as before) and one for the run (now)."""
    per_epoch = len(dataset) // batch
    t0 = time.perf_counter()
    for epoch in range(epochs):
        sampler = GlobalBatchSampler(len(dataset), batch, info=DistInfo(), seed=0, epoch=epoch)
        for _ in training_loader(dataset, sampler, workers, CPU):
            pass
    restarted = time.perf_counter() - t0
    t0 = time.perf_counter()
    stream = BatchStream(len(dataset), batch, info=DistInfo(), seed=0, epoch=0)
    batches = iter(training_loader(dataset, stream, workers, CPU))
    for _ in range(epochs * per_epoch):
        next(batches)
    del batches
    streamed = time.perf_counter() - t0
    return {
        "workers": workers,
        "batch": batch,
        "epochs": epochs,
        "batches_per_epoch": per_epoch,
        "loader_per_epoch_s": round(restarted, 3),
        "one_loader_s": round(streamed, 3),
        "saved_per_epoch_s": round((restarted - streamed) / epochs, 4),
    }


def training_demand() -> dict | None:
    """Samples/s the trainer consumes at the coco preset, from train_step.json's fastest coco case."""
    train_step = default_out("train_step.json")
    if not train_step.is_file():
        return None
    recorded = json.loads(train_step.read_text())
    coco = [r for r in recorded.get("results", []) if r.get("config") == "coco" and "median_s" in r]
    if not coco:
        return None
    best = min(coco, key=lambda r: r["median_s"] / r["batch"])
    return {
        "from": str(train_step.relative_to(Path(__file__).resolve().parents[1])),
        "device": recorded.get("device"),
        "case": {k: best[k] for k in ("batch", "precision", "channels_last")},
        "s_per_iteration": best["median_s"],
        "samples_per_s": round(best["batch"] / best["median_s"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cpus = usable_cpus()
    parser.add_argument(
        "--workers", nargs="+", type=int, help=f"loader worker counts (default 0 1 .. {cpus}: this machine's CPUs)"
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--samples", type=int, default=64, help="samples in the dataset read (default 64)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the per-epoch / run-long comparison")
    parser.add_argument("--small", type=int, default=16, help="samples in that comparison's dataset (default 16)")
    parser.add_argument("--passes", type=int, default=3, help="passes over the samples for the step costs")
    parser.add_argument("--quick", action="store_true", help="fewer samples, passes and cases: seconds")
    parser.add_argument("--sample-dir", type=Path, default=SAMPLE_DIR, help="the COCO-Stuff sample")
    parser.add_argument("--out", type=Path, help=f"results file (default: benchmarks/results/<kind of machine>/{OUT})")
    args = parser.parse_args()
    workers = args.workers if args.workers is not None else list(range(cpus + 1))
    if args.quick:
        args.samples, args.passes, args.epochs, args.small = min(args.samples, 16), 1, 2, min(args.small, 8)
        workers = workers[:2]
        args.batch_sizes = args.batch_sizes[:1]
    if min(workers) < 0 or min(args.batch_sizes) < 1 or args.samples < 2 or args.small < 2 or args.epochs < 1:
        parser.error("workers >= 0, batch sizes >= 1, --samples and --small >= 2, --epochs >= 1")
    if max(args.batch_sizes) > min(args.samples, args.small):
        parser.error(f"a batch size larger than --samples {args.samples} or --small {args.small}")
    load = load_at_start()
    torch.set_num_threads(1)  # one sample is one core's work, in a worker as in the training process
    cfg = ModelConfig.from_preset("coco")

    with tempfile.TemporaryDirectory(prefix="spade-bench-loading-") as tmp:
        root = Path(tmp) / "data"
        made_of = build_folder(root, args.samples, args.sample_dir)
        data_cfg = DataConfig(root=str(root), split="train")
        dataset = build_dataset(data_cfg, cfg, train=True, progress=False)
        small = SegmentationDataset(dataset.samples[: args.small], cfg, data_cfg, train=True)
        print(f"data: {len(dataset)} samples, {made_of}", file=sys.stderr, flush=True)

        steps = step_costs(dataset, args.passes)
        print(f"one sample: {steps['total']:.2f} ms", file=sys.stderr, flush=True)
        rows = []
        for w, b in itertools.product(workers, args.batch_sizes):
            batches = max(2, min(64, 2 * args.samples // b))
            rows.append(throughput(dataset, w, b, batches))
            print(f"workers {w}, batch {b}: {rows[-1]['samples_per_s']} samples/s", file=sys.stderr, flush=True)
        epoch_workers = max(workers)
        comparison = epochs_compared(small, epoch_workers, args.batch_sizes[0], args.epochs) if epoch_workers else None

    print()
    print("one sample, one process (ms): " + ", ".join(f"{k} {steps[k]:.2f}" for k in (*STEPS, "total")))
    print()
    header = ["workers", "batch", "samples/s", "ms/sample", "first batch s"]
    print_table(
        header,
        [
            [str(r["workers"]), str(r["batch"]), f"{r['samples_per_s']:.1f}", f"{r['ms_per_sample']:.2f}"]
            + [f"{r['first_batch_s']:.3f}"]
            for r in rows
        ],
    )
    if comparison:
        c = comparison
        print(
            f"\n{c['epochs']} epochs of {c['batches_per_epoch']} batches, {c['workers']} workers: one DataLoader per "
            f"epoch {c['loader_per_epoch_s']:.3f} s, one for the run {c['one_loader_s']:.3f} s "
            f"({1000 * c['saved_per_epoch_s']:.0f} ms saved per epoch)"
        )
    demand = training_demand()
    if demand:
        supply = max(r["samples_per_s"] for r in rows)
        print(
            f"training consumes {demand['samples_per_s']:.3f} samples/s here ({demand['from']}); the loader supplies "
            f"up to {supply:.1f}: {demand['samples_per_s'] / supply:.2%} of its capacity"
        )

    out = {
        "benchmark": "data_loading",
        "machine": describe(),
        "load_average_at_start": load,
        "config": {"preset": "coco", "output_size": list(cfg.output_size), "load_size": data_cfg.load_size},
        "data": {"samples": len(dataset), "made_of": made_of},
        "torch_threads": torch.get_num_threads(),
        "step_ms": steps,
        "loader": rows,
        "epochs_compared": comparison,
        "training_demand": demand,
    }
    write_results(args.out or default_out(OUT), out)


if __name__ == "__main__":
    main()
