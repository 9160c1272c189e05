"""`spade data synth`, `spade train` argument handling and `spade demo` end to end (tiny)."""

import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from train_helpers import SPADE, child_env

REPO = Path(__file__).resolve().parent.parent


def spade(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SPADE, *args], cwd=cwd, capture_output=True, text=True, env=child_env(**env), timeout=600)


def test_data_synth_writes_the_builtin_layout(tmp_path):
    proc = spade("data", "synth", "--out", "d", "--count", "12", "--val-count", "4", "--size", "32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "d" / "train_label").glob("*.png"))) == 12
    assert len(list((tmp_path / "d" / "val_img").glob("*.jpg"))) == 4
    assert (tmp_path / "d" / "classes.txt").read_text().splitlines()[0] == "0\tsky"
    bad = spade("data", "synth", "--out", "d", "--count", "12", "--size", "30", cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "16" in bad.stderr


def test_train_explains_missing_vgg_weights_and_bad_settings(tmp_path, monkeypatch, capsys):
    # in-process (the command line's own main): each case fails before any training starts
    from spade.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def run(*args: str) -> tuple[int, str]:
        code = main(list(args))
        return code, capsys.readouterr().err

    code, err = run("train", "--params", str(REPO / "params.yaml"), "--iterations", "1", "--no-tracking")
    assert code == 1
    # the dataset is checked first: the demo's data folder does not exist here
    assert "data/builtin" in err
    assert run("data", "synth", "--out", "data/builtin", "--count", "16", "--size", "64")[0] == 0
    code, err = run("train", "--params", str(REPO / "params.yaml"), "--iterations", "1", "--no-tracking")
    assert code == 1
    assert "vgg19-dcbb9e9d.pth" in err and "--no-vgg-loss" in err
    code, err = run("train", "--set", "train.iterations=many")
    assert code == 1 and "error:" in err
    code, err = run("train", "--set", "model.spade_kernel=4")
    assert code == 1 and "spade_kernel must be 1, 3 or 5" in err


def test_demo_end_to_end_on_tiny_settings(tmp_path):
    tiny = ["builtin.count=16", "builtin.val_count=4", "builtin.size=32", "model.crop_size=32", "model.ngf=8",
            "model.ndf=8", "data.load_size=36", "train.iterations=4", "train.sample_every=2",
            "train.checkpoint_every=2", "train.batch_size=4"]  # fmt: skip
    args = ["demo", "--params", str(REPO / "params.yaml")] + [f"--set={t}" for t in tiny]
    proc = spade(*args, cwd=tmp_path, TORCH_HOME=str(tmp_path / "torch"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "training without the VGG loss" in out
    assert "validation grid (label | real | synthesized): runs/demo/val_grid.png" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    grid = np.asarray(Image.open(tmp_path / "runs" / "demo" / "val_grid.png"))
    assert grid.shape[0] > grid.shape[1]  # 4 rows of label | real | synthesized
    assert len(list((tmp_path / "runs" / "demo" / "val_synthesized").glob("*.png"))) == 4
    assert (tmp_path / "mlruns.db").is_file()
    # running it again continues from the finished run instead of training from scratch
    again = spade(*args, cwd=tmp_path, TORCH_HOME=str(tmp_path / "torch"))
    assert again.returncode == 0 and "resuming from" in again.stderr
