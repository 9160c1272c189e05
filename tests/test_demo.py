"""`make demo`'s duration estimate: timed from a few iterations of each stage's own networks, it predicts
what the stages then take on the same machine."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipelines.demo import estimate_seconds
from spade.config import Settings
from spade.data.synthetic import generate_builtin_dataset
from spade.evaluate.segmenters.small import train_small_segmenter
from spade.train.loop import train
from tests.train_helpers import tiny_params


@pytest.fixture(scope="module")
def builtin_32(tmp_path_factory):
    return generate_builtin_dataset(
        tmp_path_factory.mktemp("builtin") / "data", count=24, val_count=8, size=32, progress=False
    )


def test_the_estimate_predicts_the_training_and_segmenter_stages(builtin_32, tmp_path):
    train_cfg = {"iterations": 40, "checkpoint_every": 1000, "log_every": 10, "deterministic": False}
    params = tiny_params(builtin_32, tmp_path / "run", train=train_cfg)
    params["segmenter"] = {"size": 32, "iterations": 40, "batch_size": 8}
    params["builtin"] = {"count": 24, "val_count": 8}
    estimate = estimate_seconds(params, fit_segmenter=True)
    assert estimate["total"] == pytest.approx(sum(v for k, v in estimate.items() if k != "total"))

    t0 = time.perf_counter()
    train(Settings.from_dict(params), progress=False)
    trained = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_small_segmenter(builtin_32, tmp_path / "seg.pt", size=32, iterations=40, batch_size=8, progress=False)
    fitted = time.perf_counter() - t0
    # the stages also read their data and write files, which the estimate leaves out; a factor of 3 either way
    # still fails an estimate that forgot the iteration count (40x) or timed another stage's networks
    for stage, actual in (("train", trained), ("segmenter", fitted)):
        assert actual / 3 <= estimate[stage] <= actual * 3, (stage, estimate[stage], actual)


def test_the_demo_pipeline_ends_with_its_champion_serving(tmp_path):
    """`spade pipeline demo` (what `make demo` runs), shortened: the pipeline's deploy task puts the promoted
    model behind a TorchServe on 127.0.0.1, one label map is sent to it, and its answer is saved. The answer
    equals `spade synthesize` of the packaged checkpoint (the float32 path: same code, same numbers)."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "spade.cli", "pipeline", "demo", "--params", str(repo / "params.yaml")]
    cmd += ["--work", "demo", "--pipeline-root", "pipeline"]
    for setting in ("train.iterations=4", "segmenter.iterations=20", "package.precision=float32",
                    "tracking.experiment=demo-serving", "builtin.count=24", "builtin.val_count=4"):  # fmt: skip
        cmd += ["--set", setting]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    said = run.stdout + run.stderr
    served = tmp_path / "demo" / "served.png"
    assert "(the champion, live)" in said and "to keep an endpoint running:" in said
    assert "torchserve --start" in said and "--model-store" in said
    image = np.asarray(Image.open(served).convert("RGB"))
    label = sorted((tmp_path / "data" / "builtin" / "val_label").glob("*.png"))[0]
    checkpoint = next((tmp_path / "pipeline").rglob("final.pt"))
    expected = tmp_path / "expected.png"
    synth = subprocess.run([sys.executable, "-m", "spade.cli", "synthesize", "--checkpoint", str(checkpoint),
                            "--label", str(label), "--output", str(expected), "--precision", "float32"],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert synth.returncode == 0, synth.stderr
    assert np.array_equal(image, np.asarray(Image.open(expected).convert("RGB")))
    # the server is stopped at the end: no TorchServe process of that folder is left
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "demo" / "serving")], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout
