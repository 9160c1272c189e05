"""The data-loading benchmark runs end to end on generated data and writes what its note describes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
