"""spade.local_runs: the set-up `spade demo`, `spade pipeline demo` and a kfp.local training task share."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from spade.config import Settings
from spade.local_runs import builtin_dataset, without_missing_vgg


def test_builtin_dataset_follows_the_params_section(tmp_path: Path) -> None:
    root = builtin_dataset({"count": 3, "val_count": 2, "size": 32, "seed": 1}, tmp_path / "b", progress=False)
    assert root == tmp_path / "b"
    assert len(list((root / "train_img").iterdir())) == 3 and len(list((root / "val_img").iterdir())) == 2
    assert json.loads((root / "dataset.json").read_text())["size"] == 32


def test_missing_vgg_weights_turn_the_vgg_loss_off(tmp_path: Path) -> None:
    notes: list[str] = []
    settings = Settings()
    missing = replace(settings, train=replace(settings.train, vgg_weights=str(tmp_path / "none.pth")))
    assert without_missing_vgg(missing, notes.append).train.vgg_loss is False
    assert len(notes) == 1 and "training without the VGG loss" in notes[0]
    off = replace(missing, train=replace(missing.train, vgg_loss=False))
    assert without_missing_vgg(off, notes.append) is off and len(notes) == 1
    weights = tmp_path / "vgg19.pth"
    weights.write_bytes(b"weights")
    present = replace(settings, train=replace(settings.train, vgg_weights=str(weights)))
    assert without_missing_vgg(present, notes.append) is present and len(notes) == 1
