"""End to end on the built-in data: small segmenter -> pseudo-labels -> evaluate a trained checkpoint."""

import hashlib
import json
import subprocess

import numpy as np
import pytest
import torch

from spade.checkpoints import Checkpoint
from spade.config import DataConfig, ModelConfig, Settings, TrackingConfig
from spade.data.dataset import build_dataset
from spade.data.layouts import find_pairs
from spade.data.synthetic import generate_builtin_dataset
from spade.evaluate.evaluation import evaluate
from spade.evaluate.inception import FIDInceptionV3
from spade.evaluate.segmentation_metrics import ConfusionMatrix
from spade.evaluate.segmenters import load_segmenter
from spade.evaluate.segmenters.small import train_small_segmenter
from spade.labels import read_id_map
from spade.precision import resolve_precision
from spade.train.loop import train
from train_helpers import SPADE, child_env, tiny_params


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Built-in data, a small segmenter fitted on it, a briefly trained SPADE model, random FID weights."""
    root = tmp_path_factory.mktemp("eval")
    data = generate_builtin_dataset(root / "data", count=48, val_count=8, size=32, progress=False)
    seg_file = train_small_segmenter(data, root / "seg.pt", size=32, iterations=150, batch_size=16, progress=False)
    settings = Settings.from_dict(tiny_params(data, root / "run", train={"iterations": 30, "batch_size": 8}))
    model = train(settings, progress=False).final_model
    torch.manual_seed(0)
    inception = root / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(FIDInceptionV3().state_dict(), inception)
    return {"data": data, "segmenter": seg_file, "model": model, "inception": inception, "root": root}


def test_real_labels_score_higher_than_shuffled_labels(world):
    seg = load_segmenter("small", world["segmenter"])
    samples = find_pairs(DataConfig(root=str(world["data"]), split="val"))
    from PIL import Image

    photos = [np.asarray(Image.open(s.image).convert("RGB")) for s in samples]
    labels = [read_id_map(s.label) for s in samples]
    predictions = [r.labels for r in seg.segment(photos)]
    own, shuffled = ConfusionMatrix(8, ignore_index=None), ConfusionMatrix(8, ignore_index=None)
    for i, pred in enumerate(predictions):
        own.update(pred, labels[i])
        shuffled.update(pred, labels[(i + 3) % len(labels)])
    assert own.mean_iou > shuffled.mean_iou + 0.2, (own.mean_iou, shuffled.mean_iou)
    assert own.pixel_accuracy > 0.7


def test_pseudolabels_of_a_photo_folder_train_directly(world, tmp_path):
    out = tmp_path / "pl"
    proc = subprocess.run(
        [*SPADE, "pseudolabel", "--images", str(world["data"] / "val_img"), "--segmenter", "small",
         "--weights", str(world["segmenter"]), "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, env=child_env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = ModelConfig.from_preset("custom", label_nc=8, contain_dontcare_label=False, use_instance=False, crop_size=32)
    dataset = build_dataset(DataConfig(root=str(out), split="train"), cfg, train=True, progress=False)
    assert len(dataset) == 8
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(line)["status"] == "ok" for line in lines)


def test_evaluate_writes_metrics_grid_and_logs_to_the_training_run(world, tmp_path, monkeypatch):
    monkeypatch.setenv("SPADE_CACHE_DIR", str(tmp_path / "cache"))
    data = DataConfig(root=str(world["data"]), split="val")
    kwargs = dict(segmenter="small", segmenter_weights=world["segmenter"], inception_weights=world["inception"],
                  batch_size=4, out_dir=tmp_path / "ev", progress=False,
                  tracking=TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}"))  # fmt: skip
    result = evaluate(world["model"], data, **kwargs)
    m = json.loads(result.metrics_path.read_text())
    assert 0 <= m["mIoU"] <= 1 and 0 <= m["accuracy"] <= 1 and m["fid"] >= 0
    assert m["counts"]["images"] == 8 and set(m["per_class_iou"]) == {
        "sky", "cloud", "mountain", "water", "grass", "tree", "sand", "rock"}  # fmt: skip
    assert (tmp_path / "ev" / "samples.png").is_file() and (tmp_path / "ev" / "confusion_matrix.csv").is_file()
    assert list((tmp_path / "cache" / "fid_stats").glob("real-*.npz")), "real statistics were not cached"
    # a second evaluation reuses the cached real statistics and gives the same numbers
    again = evaluate(world["model"], data, **kwargs)
    assert again.metrics["fid"] == pytest.approx(m["fid"], rel=1e-6)
    assert again.metrics["mIoU"] == m["mIoU"]
    # "auto" depends on the machine: the numbers say which precision produced them
    assert m["precision"] == resolve_precision("auto", "cpu")
    # the checkpoint's training run was not on this store: a linked evaluation run holds the metrics
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}").get_run(result.mlflow_run_id)
    assert run.data.metrics["eval_mIoU"] == pytest.approx(m["mIoU"])
    assert "eval_fid" in run.data.metrics
    assert run.data.tags["eval_precision"] == m["precision"]
    assert run.data.tags["spade.stage"] == "evaluation"
    # what the numbers were measured on, for the promotion gate: the val files' own fingerprint
    from spade.data.fingerprint import samples_fingerprint
    from spade.data.layouts import find_pairs

    assert m["data"] == {
        "fingerprint": samples_fingerprint(find_pairs(data)),
        "split": "val",
        "layout": data.layout,
        "images": 8,
    }
    assert run.data.tags["eval_data_fingerprint"] == m["data"]["fingerprint"] and run.data.tags["eval_split"] == "val"
    assert m["segmenter_weights"] == "sha256:" + hashlib.sha256(world["segmenter"].read_bytes()).hexdigest()
    train_split = evaluate(world["model"], DataConfig(root=str(world["data"]), split="train", max_samples=8), **kwargs)
    assert train_split.metrics["data"]["fingerprint"] != m["data"]["fingerprint"]


def test_the_real_images_score_better_than_an_untrained_model(world, tmp_path):
    """mIoU of a briefly trained model beats an untrained one: the metric tracks label fidelity."""
    ckpt = Checkpoint.load(world["model"])
    from spade.nn import SPADEGenerator

    torch.manual_seed(0)
    untrained = Checkpoint(config=ckpt.config, generator=SPADEGenerator.from_config(ckpt.config).state_dict())
    untrained_path = untrained.save(tmp_path / "untrained.pt")
    data = DataConfig(root=str(world["data"]), split="val")
    kwargs = dict(segmenter="small", segmenter_weights=world["segmenter"], fid=False, progress=False,
                  precision="float32", tracking=TrackingConfig(enabled=False))  # fmt: skip
    trained = evaluate(world["model"], data, out_dir=tmp_path / "a", **kwargs).metrics
    baseline = evaluate(untrained_path, data, out_dir=tmp_path / "b", **kwargs).metrics
    assert trained["mIoU"] > baseline["mIoU"], (trained["mIoU"], baseline["mIoU"])
    assert trained["precision"] == baseline["precision"] == "float32"


def test_evaluate_names_missing_inception_weights(world, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    proc = subprocess.run(
        [*SPADE, "evaluate", "--checkpoint", str(world["model"]), "--data", str(world["data"]),
         "--segmenter", "small", "--segmenter-weights", str(world["segmenter"]), "--no-tracking"],
        capture_output=True, text=True, env=child_env(TORCH_HOME=str(tmp_path / "torch")), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "pt_inception-2015-12-05-6726825d.pth" in proc.stderr


def test_bf16_evaluation_agrees_with_float32(world, tmp_path):
    data = DataConfig(root=str(world["data"]), split="val")
    kwargs = dict(segmenter="small", segmenter_weights=world["segmenter"], fid=False, progress=False,
                  tracking=TrackingConfig(enabled=False))  # fmt: skip
    exact = evaluate(world["model"], data, out_dir=tmp_path / "f32", **kwargs).metrics
    fast = evaluate(world["model"], data, out_dir=tmp_path / "bf16", precision="bfloat16", **kwargs).metrics
    assert abs(fast["accuracy"] - exact["accuracy"]) < 0.03
    assert abs(fast["mIoU"] - exact["mIoU"]) < 0.05


def test_metrics_go_to_the_checkpoints_own_training_run(world, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    params = tiny_params(world["data"], tmp_path / "run", train={"iterations": 2, "batch_size": 8})
    params["tracking"] = {"enabled": True, "tracking_uri": uri, "experiment": "own-run"}
    result = train(Settings.from_dict(params), progress=False)
    assert Checkpoint.load(result.final_model).meta["mlflow_run_id"] == result.run_id
    data = DataConfig(root=str(world["data"]), split="val")
    ev = evaluate(result.final_model, data, segmenter="small", segmenter_weights=world["segmenter"], fid=False,
                  out_dir=tmp_path / "ev", progress=False)  # fmt: skip
    assert ev.mlflow_run_id == result.run_id
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=uri).get_run(result.run_id)
    assert run.data.metrics["eval_mIoU"] == pytest.approx(ev.metrics["mIoU"])
    assert run.info.status == "FINISHED"


def test_fid_and_segmenter_commands(world, tmp_path, monkeypatch, capsys):
    from spade.cli import main

    monkeypatch.setenv("SPADE_CACHE_DIR", str(tmp_path / "cache"))
    val = str(world["data"] / "val_img")
    code = main(["fid", val, val, "--inception-weights", str(world["inception"]), "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert out.out.startswith("FID: ") and abs(float(out.out.split()[1])) < 1e-2
    code = main(
        ["segmenter", "train", "--data", str(world["data"]), "--out", str(tmp_path / "seg.pt"),
         "--iterations", "10", "--size", "32", "--batch-size", "8"]
    )  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert (tmp_path / "seg.pt").is_file() and "wrote" in out.out
    assert load_segmenter("small", tmp_path / "seg.pt").num_classes == 8


def test_the_data_fingerprint_is_the_same_for_a_copy_and_for_a_folder_of_links(world, tmp_path):
    """The gate compares numbers of the same data only: the same files copied elsewhere, or linked (DVC's
    symlink cache, pseudo-labelled photos), are the same data; one changed byte is not."""
    import shutil

    from spade.data.fingerprint import samples_fingerprint
    from spade.data.layouts import find_pairs

    def fingerprint(root) -> str:
        return samples_fingerprint(find_pairs(DataConfig(root=str(root), split="val")))

    copy = tmp_path / "copy"
    shutil.copytree(world["data"], copy)
    linked = tmp_path / "linked"  # labels of its own, photos linked to where they lie (as pseudolabel writes)
    for path in world["data"].rglob("*"):
        if path.is_file():
            target = linked / path.relative_to(world["data"])
            target.parent.mkdir(parents=True, exist_ok=True)
            if "_img" in path.parent.name:
                target.symlink_to(path)
            else:
                shutil.copyfile(path, target)
    assert fingerprint(world["data"]) == fingerprint(copy) == fingerprint(linked)
    label = sorted((copy / "val_label").glob("*.png"))[0]
    data = bytearray(label.read_bytes())
    data[-20] ^= 1
    label.write_bytes(bytes(data))
    assert fingerprint(copy) != fingerprint(world["data"])
