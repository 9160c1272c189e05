"""What the benchmarks share: timing with warm-up and a time budget, one fresh worker process per case
(so its peak memory is its own), peak-memory readings, the common command-line options and the table."""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_stuff_sample"


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss counts KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def memory_after_setup() -> dict:
    """The peak of the set-up, then restart the peak count from the resident memory now (Linux only), so
    that the peak read after the timed calls is theirs and not a transient of loading."""
    setup_peak = peak_rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    return {"setup_peak_rss_mb": round(setup_peak, 1), "rss_ready_mb": round(peak_rss_mb(), 1), "peak_reset": reset}


def load_at_start() -> float:
    """The 1-minute load average, with a warning when other work competes for the CPU."""
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} at start: other work makes the timings noisy", file=sys.stderr)
    return round(load, 2)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    call: Callable[[], object], device: torch.device, *, warmup_s: float, budget_s: float, min_reps: int, max_reps: int
) -> tuple[dict, object, object]:
    """Warm up for `warmup_s` (at least one call), then time as many calls as fill `budget_s`, within
    [min_reps, max_reps]. Returns the timings, the first call's result and the last one's."""

    def timed() -> tuple[float, object]:
        synchronize(device)
        t0 = time.perf_counter()
        value = call()
        synchronize(device)
        return time.perf_counter() - t0, value

    dt, first = timed()
    warm = [dt]
    while sum(warm) < warmup_s:
        warm.append(timed()[0])
    reps = min(max_reps, max(min_reps, 1, math.ceil(budget_s / warm[-1])))
    times = []
    for _ in range(reps):
        dt, last = timed()
        times.append(dt)
    stats = {
        "warmup_calls": len(warm),
        "warmup_s": [round(t, 4) for t in warm],
        "reps": reps,
        "times_s": [round(t, 4) for t in times],
        "median_s": statistics.median(times),
        "min_s": min(times),
    }
    return stats, first, last


def run_worker(script: str, spec: dict, result: Path) -> dict:
    """Run one case in a fresh process (so its peak memory is its own); its result, or {"error": ...}."""
    proc = subprocess.run([sys.executable, script, "--_worker", json.dumps({**spec, "result": str(result)})])
    if proc.returncode != 0 or not result.is_file():
        return {"error": f"worker exited with status {proc.returncode}"}
    return json.loads(result.read_text())


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    for line in (header, *rows):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))


def add_common_arguments(parser: argparse.ArgumentParser, *, unit: str, budget: str, max_reps: int, out: str) -> None:
    """--device, --quick, --budget, --min-reps, --max-reps, --warmup, --threads, --sample-dir, --out, --_worker."""
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help=f"2+ timed {unit}, a shorter budget per case")
    parser.add_argument("--budget", type=float, help=f"seconds of timed {unit} per case (default {budget})")
    parser.add_argument("--min-reps", type=int, help=f"timed {unit} per case at least (default 3, 2 with --quick)")
    parser.add_argument("--max-reps", type=int, default=max_reps, help=f"timed {unit} per case at most")
    parser.add_argument("--warmup", type=float, default=2.0, help=f"seconds of warm-up {unit} (at least one)")
    parser.add_argument("--threads", type=int, help="torch threads in each worker (default: torch's choice)")
    parser.add_argument("--sample-dir", type=Path, default=SAMPLE_DIR, help="the COCO-Stuff sample")
    parser.add_argument("--out", type=Path, help=f"results file (default: benchmarks/results/<kind of machine>/{out})")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)


def results_path(args: argparse.Namespace, name: str) -> Path:
    """--out, else benchmarks/results/<kind of this machine>/<name> (machine.kind_slug: one folder per CPU kind)."""
    from machine import default_out

    return args.out if args.out is not None else default_out(name, getattr(args, "device", "cpu"))


def timing_settings(parser: argparse.ArgumentParser, args: argparse.Namespace, *, budget: float, quick: float) -> dict:
    """The timing settings every worker gets; fails on a CUDA request without CUDA."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return {
        "threads": args.threads,
        "warmup_s": args.warmup,
        "budget_s": args.budget if args.budget is not None else (quick if args.quick else budget),
        "min_reps": args.min_reps if args.min_reps is not None else (2 if args.quick else 3),
        "max_reps": args.max_reps,
    }


def write_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
