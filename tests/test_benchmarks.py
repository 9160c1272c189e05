"""The data-loading benchmark runs end to end on generated data and writes what its note describes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_data_loading_benchmark_measures_the_trainers_loader(tmp_path):
    out = tmp_path / "loading.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "data_loading.py"), "--quick", "--workers", "0", "1"]
        + ["--sample-dir", str(tmp_path / "absent"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["data"]["made_of"].startswith("generated 640x480")
    assert result["data"]["samples"] == 16
    steps = result["step_ms"]
    parts = sum(v for k, v in steps.items() if k != "total")
    assert all(v > 0 for v in steps.values()) and 0.5 * steps["total"] <= parts <= 1.5 * steps["total"]
    assert [(r["workers"], r["batch"]) for r in result["loader"]] == [(0, 1), (1, 1)]
    assert all(r["samples_per_s"] > 0 and r["first_batch_s"] > 0 for r in result["loader"])
    compared = result["epochs_compared"]
    assert compared["workers"] == 1 and compared["epochs"] == 2 and compared["batches_per_epoch"] == 8
    assert compared["loader_per_epoch_s"] > 0 and compared["one_loader_s"] > 0
    assert "samples/s" in proc.stdout and "one sample, one process" in proc.stdout


def _script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )


def test_the_readme_speed_tables_are_the_committed_results_files():
    """Every figure of the README's speed section is rendered from benchmarks/results/ (one table per kind of
    machine, its CPU named above it); an edited figure or a new results file not rendered fails here."""
    proc = _script("benchmarks/readme_tables.py", "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    readme = (ROOT / "README.md").read_text()
    kinds = sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir() if p.is_dir())
    assert kinds and all(f"`benchmarks/results/{kind}/`" in readme for kind in kinds)


def test_the_table_shows_the_files_figures_under_their_cpu(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import readme_tables

    folder = tmp_path / "avx2"
    folder.mkdir()
    machine = {"cpu_kind": "Some CPU 7000, AVX2, bf16 not native", "cores": 2, "torch": "9.9", "cuda": None}
    synthesis = {
        "machine": machine,
        "results": [
            {"config": "coco", "batch": 1, "path": path, "median_s": s, "load_s": 0.5, "vs_float32_eager": v}
            for path, s, v in [
                ("float32-eager", 5.85, {}),
                ("bfloat16-eager", 9.5, {"psnr_db": 41.23}),
                ("float32-fast", 3.18, {"psnr_db": 88.0}),
                ("bfloat16-fast", 7.7, {"psnr_db": 40.0}),
            ]
        ]
        + [{"config": "small", "batch": 1, "path": "float32-eager", "median_s": 0.01, "vs_float32_eager": {}}],
    }
    (folder / "synthesis.json").write_text(json.dumps(synthesis))
    train = {
        "machine": machine,
        "train_settings": {"vgg_loss": True},
        "results": [{"config": "coco", "batch": 1, "precision": "float32", "channels_last": False, "median_s": 12.345}],
    }
    (folder / "train_step.json").write_text(json.dumps(train))
    monkeypatch.setattr(readme_tables, "ROOT", tmp_path)
    text = readme_tables.tables(tmp_path)
    lines = text.splitlines()
    assert lines[0] == "**Some CPU 7000, AVX2, bf16 not native; 2 cores, torch 9.9**"
    assert "| synthesis, s / image | 5.85 | 9.50 | 3.18 | 7.70 |" in lines
    assert "| PSNR from eager float32, dB (COCO-Stuff sample) | reference | 41.2 | 88.0 | 40.0 |" in lines
    assert "| training iteration (D + G, VGG on), s | 12.35 |  |  |  |" in lines
    assert lines[-1] == "From `avx2/`: `synthesis.json`, `train_step.json`."
    assert "0.01" not in text  # the small configuration is not the table's


def test_fast_path_psnr_compares_every_path_with_float32_eager(tmp_path):
    from PIL import Image

    from tests.serve_helpers import label_map, make_checkpoint

    ckpt = make_checkpoint(crop_size=32, ngf=8)
    ckpt.save(tmp_path / "model.pt")
    labels = tmp_path / "val_label"
    labels.mkdir()
    for i in range(3):
        Image.fromarray(label_map(32, 32, seed=i)).save(labels / f"{i:03d}.png")
    out = tmp_path / "psnr.json"
    proc = _script(
        "benchmarks/fast_path_psnr.py",
        "--checkpoint",
        str(tmp_path / "model.pt"),
        "--labels",
        str(labels),
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    by_path = {r["path"]: r for r in result["results"]}
    assert by_path["float32-eager"]["identical_images"] == 3 and by_path["float32-eager"]["max_abs_diff"] == 0
    assert by_path["float32-fast"]["max_abs_diff"] <= 2  # float32 fast differs by rounding only
    # bf16 fast, recomputed here: 10 log10(255^2 / MSE) of the 0..255 images, the lowest over the maps
    import numpy as np

    from spade.synthesize import Synthesizer, prepare_label

    maps = [prepare_label(ckpt.config, p) for p in sorted(labels.iterdir())]
    reference = Synthesizer(ckpt, precision="float32", fast=False)
    fast = Synthesizer(ckpt, precision="bfloat16", fast=True)
    lowest = math.inf
    for m in maps:
        a = ((reference.synthesize_inputs([m])[0] + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).double()
        b = ((fast.synthesize_inputs([m])[0] + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).double()
        lowest = min(lowest, 10 * np.log10(255**2 / float(((a - b) ** 2).mean())))
    assert abs(by_path["bfloat16-fast"]["min_psnr_db"] - lowest) <= 0.01
    assert result["data"]["what"] == "model.pt, 32px, 3 label maps"
    assert "min PSNR dB" in proc.stdout


def test_fast_path_psnr_names_a_missing_checkpoint(tmp_path):
    proc = _script("benchmarks/fast_path_psnr.py", "--checkpoint", str(tmp_path / "nope.pt"))
    assert proc.returncode == 2 and "nope.pt" in proc.stderr
