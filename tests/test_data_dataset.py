from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ImageFile
from torch.utils.data import DataLoader

from data_builders import PALETTE, block_sample, make_ade20k, make_cityscapes, make_flat, save_ids, save_photo
from spade.config import PREPROCESS_MODES, DataConfig, ModelConfig
from spade.data import SegmentationDataset, build_dataset, check_samples, find_pairs
from spade.data.transforms import Geometry, plan, resized_size
from spade.errors import SpadeError
from spade.synthesize import prepare_label, read_rgb

SMALL = ModelConfig.from_preset("custom", crop_size=32, use_instance=True)  # 8 classes, 32x32 output


def small_dataset(root: Path, *, train: bool, n: int = 3, model: ModelConfig = SMALL, **data: object):
    data_cfg = DataConfig(root=str(root), **{"load_size": 40, **data})
    return build_dataset(data_cfg, model, train=train, progress=False)


def assert_aligned(item: dict) -> None:
    """The photo shows PALETTE[class] inside every block, and each instance lies in one class."""
    label = item["label"][0].numpy()
    inst = item["instance"][0].numpy()
    for v in np.unique(inst):
        assert len(np.unique(label[inst == v])) == 1
    rgb = ((item["image"] + 1) * 127.5).permute(1, 2, 0).numpy()
    pad = np.pad(label, 2, mode="edge")
    h, w = label.shape
    interior = np.ones_like(label, dtype=bool)
    for dy in range(5):
        for dx in range(5):
            interior &= pad[dy : dy + h, dx : dx + w] == label
    assert interior.sum() > 0.2 * label.size
    assert np.abs(rgb - PALETTE[label])[interior].mean() < 6


def test_truncated_images_are_not_loaded_silently() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_item_types_and_shapes(tmp_path: Path) -> None:
    make_flat(tmp_path, n=2)
    ds = small_dataset(tmp_path, train=True)
    assert isinstance(ds, SegmentationDataset) and len(ds) == 2 and ds.skipped == []
    item = ds[1]
    assert set(item) == {"label", "instance", "image", "name"}
    assert item["label"].shape == item["instance"].shape == (1, 32, 32)
    assert item["label"].dtype == item["instance"].dtype == torch.int64
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["label"].min() >= 0 and item["label"].max() < SMALL.label_nc
    assert item["name"] == "000001"
    assert_aligned(item)


def test_eval_matches_the_synthesis_test_mode(tmp_path: Path) -> None:
    make_flat(tmp_path, n=2)
    ds = small_dataset(tmp_path, train=False)
    for i, sample in enumerate(ds.samples):
        item = ds[i]
        ref = prepare_label(SMALL, sample.label, sample.instance)
        assert torch.equal(item["label"], ref.label)
        assert torch.equal(item["instance"], ref.instance)
        assert torch.equal(item["image"], read_rgb(sample.image, SMALL.output_size))
        again = ds[i]
        assert all(torch.equal(item[k], again[k]) for k in ("label", "instance", "image"))


def test_train_crops_are_random_and_reproducible(tmp_path: Path) -> None:
    make_flat(tmp_path, n=1)
    ds = small_dataset(tmp_path, train=True, no_flip=True)
    draws = []
    for seed in range(6):
        torch.manual_seed(seed)
        first = ds[0]
        torch.manual_seed(seed)
        second = ds[0]
        assert all(torch.equal(first[k], second[k]) for k in ("label", "instance", "image"))
        assert_aligned(first)
        draws.append(first["image"])
    assert len({d.numpy().tobytes() for d in draws}) > 1


def test_flip_is_applied_to_label_instance_and_image_together(tmp_path: Path) -> None:
    make_flat(tmp_path, n=1)
    flipping = small_dataset(tmp_path, train=True)
    plain = small_dataset(tmp_path, train=True, no_flip=True)
    outcomes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        a = flipping[0]
        torch.manual_seed(seed)
        b = plain[0]
        same = [torch.equal(a[k], b[k]) for k in ("label", "instance", "image")]
        mirrored = [torch.equal(a[k], b[k].flip(-1)) for k in ("label", "instance", "image")]
        assert all(same) or all(mirrored)
        outcomes.add(all(same))
        assert_aligned(a)
    assert outcomes == {True, False}


def test_plan_with_generator_is_reproducible_and_in_bounds() -> None:
    data = DataConfig(load_size=50)
    plans = [plan((60, 45), SMALL, data, train=True, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert plans[0] == plans[1]
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        g = plan((60, 45), SMALL, data, train=True, generator=gen)
        left, top, w, h = g.crop
        assert g.size == (50, 50) and (w, h) == (32, 32)
        assert 0 <= left <= 18 and 0 <= top <= 18
        seen.add((left, top))
    assert {0, 18} <= {x for x, _ in seen}
    assert plan((60, 45), SMALL, data, train=False) == Geometry((32, 32), None, False)


def test_resized_size_per_mode() -> None:
    out = (256, 256)
    assert resized_size((400, 200), "resize_and_crop", load_size=286, output_size=out) == (286, 286)
    assert resized_size((200, 400), "scale_width_and_crop", load_size=286, output_size=out) == (286, 572)
    assert resized_size((400, 100), "scale_width_and_crop", load_size=286, output_size=out) == (286, 256)
    assert resized_size((400, 200), "scale_shortside_and_crop", load_size=286, output_size=out) == (572, 286)
    assert resized_size((200, 300), "scale_shortside_and_crop", load_size=286, output_size=out) == (286, 429)
    assert resized_size((2048, 1024), "fixed", load_size=512, output_size=(256, 512)) == (512, 256)
    assert resized_size((100, 70), "none", load_size=286, output_size=out) == (96, 64)
    assert resized_size((640, 480), "scale_width_and_crop", load_size=286, output_size=out, train=False) == out


@pytest.mark.parametrize("mode", PREPROCESS_MODES)
@pytest.mark.parametrize("train", [True, False])
def test_output_shape_of_every_mode(tmp_path: Path, mode: str, train: bool) -> None:
    make_flat(tmp_path, n=1, size=(100, 70))
    model = ModelConfig.from_preset("custom", crop_size=64, aspect_ratio=2.0, use_instance=True)
    assert model.output_size == (32, 64)
    torch.manual_seed(0)
    item = small_dataset(tmp_path, train=train, model=model, preprocess_mode=mode, load_size=70)[0]
    expected = (64, 96) if mode == "none" else (32, 64)
    assert item["label"].shape[1:] == item["instance"].shape[1:] == item["image"].shape[1:] == expected
    assert_aligned(item)


def test_ade20k_offset_makes_zero_dont_care(tmp_path: Path) -> None:
    make_ade20k(tmp_path, "val", 1, size=(32, 32))
    raw = np.zeros((32, 32), np.uint8)
    raw[:, 8:16], raw[:, 16:24], raw[:, 24:] = 1, 150, 255
    save_ids(next((tmp_path / "annotations" / "validation").iterdir()), raw)
    model = ModelConfig.from_preset("ade20k", crop_size=32)
    ds = build_dataset(DataConfig(layout="ade20k", root=str(tmp_path), split="val"), model, train=False, progress=False)
    label = ds[0]["label"][0]
    assert model.dontcare_id == 150
    assert torch.equal(label[0, ::8], torch.tensor([150, 0, 149, 150]))
    assert torch.equal(ds[0]["instance"], ds[0]["label"])


def test_cityscapes_keeps_16_bit_instance_ids(tmp_path: Path) -> None:
    make_cityscapes(tmp_path, "train", {"aachen": 2, "bochum": 1}, size=(160, 80))
    model = ModelConfig.from_preset("cityscapes", crop_size=128)
    data = DataConfig(layout="cityscapes", root=str(tmp_path), preprocess_mode="fixed", load_size=128)
    ds = build_dataset(data, model, train=True, progress=False)
    assert [s.name for s in ds.samples] == ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000019"]
    items = [ds[i] for i in range(3)]
    assert all(it["label"].shape == (1, 64, 128) for it in items)
    assert max(int(it["instance"].max()) for it in items) > 255
    assert all(int(it["label"].max()) < 35 for it in items)
    for it in items:
        assert_aligned(it)


def test_instance_falls_back_to_class_ids(tmp_path: Path) -> None:
    make_flat(tmp_path / "a", n=1, instances=False)
    item = small_dataset(tmp_path / "a", train=True)[0]
    assert torch.equal(item["instance"], item["label"])
    make_flat(tmp_path / "b", n=1)
    no_inst_model = ModelConfig.from_preset("custom", crop_size=32, use_instance=False)
    item = small_dataset(tmp_path / "b", train=False, model=no_inst_model)[0]
    assert torch.equal(item["instance"], item["label"])


def make_bad_files(root: Path) -> dict[str, Path]:
    """Six coco-layout samples; five of them broken in a different way."""
    make_flat(root, n=6, size=(48, 40))
    label, inst, rgb = block_sample(0, (48, 40))
    label[:5, :5] = 200
    bad = {
        "range": save_ids(root / "train_label" / "000001.png", label),
        "truncated": root / "train_img" / "000002.jpg",
        "image_size": save_photo(root / "train_img" / "000003.jpg", rgb[:, :40]),
        "instance_size": save_ids(root / "train_inst" / "000004.png", inst[:30].astype(np.uint8)),
        "truncated_label": root / "train_label" / "000005.png",
    }
    for key in ("truncated", "truncated_label"):
        data = bad[key].read_bytes()
        bad[key].write_bytes(data[: len(data) // 2])
    return bad


def test_check_samples_names_every_bad_file_with_its_reason(tmp_path: Path) -> None:
    bad = make_bad_files(tmp_path)
    samples = find_pairs(DataConfig(layout="coco", root=str(tmp_path)))
    model = ModelConfig.from_preset("coco", crop_size=32)
    with pytest.raises(SpadeError) as err:
        check_samples(samples, model, skip_bad=False, progress=False)
    msg = str(err.value)
    assert msg.startswith("5 of 6 sample(s)")
    assert f"{bad['range']}: label values 200 are out of range" in msg
    assert f"{bad['truncated']}: cannot read image" in msg and "truncated" in msg
    assert f"{bad['image_size']}: image is 40x40 but its label map 000003.png is 48x40" in msg
    assert f"{bad['instance_size']}: instance map is 48x30" in msg
    assert f"{bad['truncated_label']}: cannot read label map" in msg
    assert "data.skip_bad" in msg

    good, problems = check_samples(samples, model, skip_bad=True, progress=False)
    assert [s.name for s in good] == ["000000"]
    assert len(problems) == 5
    assert sorted(p.split(": ")[0] for p in problems) == sorted(str(p) for p in bad.values())


def test_cityscapes_rejects_255_without_dont_care(tmp_path: Path) -> None:
    make_cityscapes(tmp_path, "val", {"ulm": 1})
    path = next((tmp_path / "gtFine" / "val" / "ulm").glob("*_labelIds.png"))
    save_ids(path, np.full((32, 64), 255, np.uint8))  # the builder's default size
    samples = find_pairs(DataConfig(layout="cityscapes", root=str(tmp_path), split="val"))
    with pytest.raises(SpadeError, match="255 .*no don't-care class"):
        check_samples(samples, ModelConfig.from_preset("cityscapes"), skip_bad=False, progress=False)


def test_build_dataset_skip_bad_reports_and_keeps_the_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_bad_files(tmp_path)
    (tmp_path / "train_img" / "000000.jpg").rename(tmp_path / "train_img" / "000009.jpg")
    model = ModelConfig.from_preset("coco", crop_size=32)
    data = DataConfig(layout="coco", root=str(tmp_path), skip_bad=True, load_size=40)
    with pytest.raises(SpadeError, match="none of the 5 sample"):
        build_dataset(data, model, train=True, progress=False)
    make_flat(tmp_path / "more", n=3)
    for sub in ("img", "label", "inst"):
        for p in (tmp_path / "more" / f"train_{sub}").iterdir():
            p.rename(tmp_path / f"train_{sub}" / f"ok{p.name}")
    capsys.readouterr()
    log = tmp_path / "logs" / "skipped.txt"
    ds = build_dataset(data, model, train=True, progress=False, skipped_log=log)
    assert [s.name for s in ds.samples] == ["ok000000", "ok000001", "ok000002"]
    assert len(ds.skipped) == 7  # two unpaired files, five broken samples
    assert log.read_text().splitlines() == ds.skipped
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped 7" in err and str(log) in err


def test_max_samples_limits_the_dataset(tmp_path: Path) -> None:
    make_flat(tmp_path, n=4)
    assert len(small_dataset(tmp_path, train=False, max_samples=3)) == 3


def test_dataloader_with_workers_collates_and_is_seeded(tmp_path: Path) -> None:
    make_flat(tmp_path, n=4)
    ds = small_dataset(tmp_path, train=True)

    def epoch() -> list[dict]:
        torch.manual_seed(1)
        loader = DataLoader(ds, batch_size=2, shuffle=True, num_workers=2)
        return list(loader)

    first, second = epoch(), epoch()
    assert len(first) == 2
    batch = first[0]
    assert batch["label"].shape == batch["instance"].shape == (2, 1, 32, 32)
    assert batch["image"].shape == (2, 3, 32, 32) and batch["label"].dtype == torch.int64
    assert isinstance(batch["name"], list) and all(isinstance(n, str) for n in batch["name"])
    assert sorted(n for b in first for n in b["name"]) == [f"{i:06d}" for i in range(4)]
    for a, b in zip(first, second, strict=True):
        assert a["name"] == b["name"]
        assert all(torch.equal(a[k], b[k]) for k in ("label", "instance", "image"))


def test_coco_stuff_sample_dataset(coco_sample: Path) -> None:
    model = ModelConfig.from_preset("coco")
    ds = build_dataset(
        DataConfig(layout="coco", root=str(coco_sample), split="val"), model, train=False, progress=False
    )
    assert len(ds) == len(list((coco_sample / "val_label").glob("*.png"))) and ds.skipped == []
    item = ds[0]
    assert item["label"].shape == item["instance"].shape == (1, 256, 256)
    assert item["image"].shape == (3, 256, 256)
    assert int(item["label"].min()) >= 0 and int(item["label"].max()) <= model.dontcare_id
    ref = prepare_label(model, ds.samples[0].label, ds.samples[0].instance)
    assert torch.equal(item["label"], ref.label) and torch.equal(item["instance"], ref.instance)
    train = build_dataset(
        DataConfig(layout="coco", root=str(coco_sample), split="val", max_samples=2), model, train=True, progress=False
    )
    torch.manual_seed(0)
    assert train[1]["image"].shape == (3, 256, 256)
