from __future__ import annotations

from pathlib import Path

import pytest

from data_builders import block_sample, make_ade20k, make_cityscapes, make_flat, save_ids, save_photo
from spade.config import DataConfig
from spade.data.layouts import Sample, find_pairs
from spade.errors import SpadeError


def test_coco_pairs_by_stem_with_instances(tmp_path: Path) -> None:
    make_flat(tmp_path, "val", 3)
    make_flat(tmp_path, "train", 2)
    samples = find_pairs(DataConfig(layout="coco", root=str(tmp_path), split="val"))
    assert [s.name for s in samples] == ["000000", "000001", "000002"]
    for s in samples:
        assert s == Sample(
            label=tmp_path / "val_label" / f"{s.name}.png",
            image=tmp_path / "val_img" / f"{s.name}.jpg",
            instance=tmp_path / "val_inst" / f"{s.name}.png",
            name=s.name,
        )
    assert len(find_pairs(DataConfig(layout="coco", root=str(tmp_path), split="train"))) == 2


def test_coco_without_instance_folder(tmp_path: Path) -> None:
    make_flat(tmp_path, "train", 2, instances=False)
    samples = find_pairs(DataConfig(layout="coco", root=str(tmp_path)))
    assert len(samples) == 2 and all(s.instance is None for s in samples)


def test_ade20k_uses_training_and_validation_folders(tmp_path: Path) -> None:
    make_ade20k(tmp_path, "train", 2)
    make_ade20k(tmp_path, "val", 3)
    val = find_pairs(DataConfig(layout="ade20k", root=str(tmp_path), split="val"))
    assert [s.name for s in val] == [f"ADE_valid_{i:08d}" for i in (1, 2, 3)]
    assert all(s.instance is None for s in val)
    assert all(s.image.parent == tmp_path / "images" / "validation" for s in val)
    assert all(s.label.parent == tmp_path / "annotations" / "validation" for s in val)
    assert len(find_pairs(DataConfig(layout="ade20k", root=str(tmp_path), split="train"))) == 2


def test_cityscapes_pairs_by_prefix_across_cities(tmp_path: Path) -> None:
    make_cityscapes(tmp_path, "train", {"bochum": 1, "aachen": 2})
    samples = find_pairs(DataConfig(layout="cityscapes", root=str(tmp_path)))
    assert [s.name for s in samples] == ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000019"]
    s = samples[2]
    assert s.image == tmp_path / "leftImg8bit/train/bochum/bochum_000000_000019_leftImg8bit.png"
    assert s.label == tmp_path / "gtFine/train/bochum/bochum_000000_000019_gtFine_labelIds.png"
    assert s.instance == tmp_path / "gtFine/train/bochum/bochum_000000_000019_gtFine_instanceIds.png"


def test_cityscapes_missing_partners_are_named_with_expected_path(tmp_path: Path) -> None:
    make_cityscapes(tmp_path, "val", {"lindau": 2, "munster": 1})
    (tmp_path / "leftImg8bit/val/lindau/lindau_000001_000019_leftImg8bit.png").unlink()
    (tmp_path / "gtFine/val/munster/munster_000000_000019_gtFine_instanceIds.png").unlink()
    with pytest.raises(SpadeError) as err:
        find_pairs(DataConfig(layout="cityscapes", root=str(tmp_path), split="val"))
    msg = str(err.value)
    assert "lindau_000001_000019_gtFine_labelIds.png: no image" in msg
    assert str(tmp_path / "leftImg8bit/val/lindau/lindau_000001_000019_leftImg8bit.png") in msg
    assert "munster_000000_000019_gtFine_instanceIds.png" in msg and "no instance map" in msg


def test_custom_defaults_accept_photo_suffixes(tmp_path: Path) -> None:
    make_flat(tmp_path, "train", 4, instances=False, suffixes=(".jpg", ".jpeg", ".png", ".webp"))
    (tmp_path / "train_img" / ".DS_Store").write_text("x")
    (tmp_path / "train_img" / "notes.txt").write_text("x")
    samples = find_pairs(DataConfig(layout="custom", root=str(tmp_path)))
    assert [s.image.suffix for s in samples] == [".jpg", ".jpeg", ".png", ".webp"]
    assert all(s.instance is None for s in samples)


def test_custom_default_instance_folder_is_used_when_present(tmp_path: Path) -> None:
    make_flat(tmp_path, "val", 2)
    samples = find_pairs(DataConfig(layout="custom", root=str(tmp_path), split="val"))
    assert [s.instance for s in samples] == [tmp_path / "val_inst" / f"{i:06d}.png" for i in range(2)]


def test_custom_configured_folders_relative_and_absolute(tmp_path: Path) -> None:
    make_flat(tmp_path, n=2, label_folder="photos_label", image_folder="photos", instance_folder="masks")
    data = DataConfig(
        root=str(tmp_path), label_dir="photos_label", image_dir=str(tmp_path / "photos"), instance_dir="masks"
    )
    samples = find_pairs(data)
    assert [(s.label.parent, s.image.parent, s.instance.parent) for s in samples] == [
        (tmp_path / "photos_label", tmp_path / "photos", tmp_path / "masks")
    ] * 2


def test_custom_configured_instance_folder_must_exist(tmp_path: Path) -> None:
    make_flat(tmp_path, n=1, instances=False)
    with pytest.raises(SpadeError, match="instance .*folder not found: .*nowhere"):
        find_pairs(DataConfig(root=str(tmp_path), instance_dir="nowhere"))


def test_missing_root_and_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(SpadeError, match=f"data.root not found: {tmp_path / 'absent'}"):
        find_pairs(DataConfig(layout="coco", root=str(tmp_path / "absent")))
    (tmp_path / "train_label").mkdir()
    with pytest.raises(SpadeError, match=f"image folder not found: {tmp_path / 'train_img'}"):
        find_pairs(DataConfig(layout="coco", root=str(tmp_path)))
    with pytest.raises(SpadeError, match=f"label folder not found: {tmp_path / 'annotations' / 'training'}"):
        find_pairs(DataConfig(layout="ade20k", root=str(tmp_path)))
    with pytest.raises(SpadeError, match=f"image folder not found: {tmp_path / 'leftImg8bit' / 'val'}"):
        find_pairs(DataConfig(layout="cityscapes", root=str(tmp_path), split="val"))


def test_empty_folders_raise(tmp_path: Path) -> None:
    (tmp_path / "train_label").mkdir()
    (tmp_path / "train_img").mkdir()
    with pytest.raises(SpadeError, match="no samples in"):
        find_pairs(DataConfig(root=str(tmp_path)))


def test_missing_partners_in_both_directions_are_named(tmp_path: Path) -> None:
    make_flat(tmp_path, n=4)
    (tmp_path / "train_img" / "000001.jpg").unlink()
    (tmp_path / "train_label" / "000002.png").unlink()
    (tmp_path / "train_inst" / "000003.png").unlink()
    with pytest.raises(SpadeError) as err:
        find_pairs(DataConfig(layout="coco", root=str(tmp_path)))
    msg = str(err.value)
    assert msg.startswith("3 file(s)")
    assert f"{tmp_path / 'train_label' / '000001.png'}: no image" in msg
    assert f"{tmp_path / 'train_img' / '000002.jpg'}: no label map" in msg
    assert f"{tmp_path / 'train_label' / '000003.png'}: no instance map" in msg
    assert "data.skip_bad" in msg


def test_long_problem_lists_are_shortened(tmp_path: Path) -> None:
    make_flat(tmp_path, n=1, instances=False)
    for i in range(13):
        save_photo(tmp_path / "train_img" / f"extra{i:02d}.jpg", block_sample(0)[2])
    with pytest.raises(SpadeError) as err:
        find_pairs(DataConfig(root=str(tmp_path)))
    msg = str(err.value)
    assert "extra09.jpg" in msg and "extra10.jpg" not in msg
    assert "... and 3 more" in msg


def test_duplicate_stems_are_reported(tmp_path: Path) -> None:
    make_flat(tmp_path, n=2, instances=False)
    save_photo(tmp_path / "train_img" / "000001.png", block_sample(1)[2])
    with pytest.raises(SpadeError, match=r"several image files for '000001' \(000001.jpg, 000001.png\)"):
        find_pairs(DataConfig(root=str(tmp_path)))
    problems: list[str] = []
    samples = find_pairs(DataConfig(root=str(tmp_path), skip_bad=True), problems=problems)
    assert [s.name for s in samples] == ["000000"] and len(problems) == 1


def test_skip_bad_drops_and_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_flat(tmp_path, n=5)
    (tmp_path / "train_img" / "000001.jpg").unlink()
    (tmp_path / "train_label" / "000002.png").unlink()
    (tmp_path / "train_inst" / "000004.png").unlink()
    data = DataConfig(layout="coco", root=str(tmp_path), skip_bad=True)
    problems: list[str] = []
    samples = find_pairs(data, problems=problems)
    assert [s.name for s in samples] == ["000000", "000003"]
    assert len(problems) == 3 and all(str(tmp_path) in p for p in problems)
    assert capsys.readouterr().err == ""
    assert len(find_pairs(data)) == 2
    assert "dropped 3 unpaired file(s)" in capsys.readouterr().err


def test_skip_bad_with_nothing_left_raises(tmp_path: Path) -> None:
    make_flat(tmp_path, n=2, instances=False)
    for p in (tmp_path / "train_img").iterdir():
        p.rename(p.with_name("x" + p.name))
    with pytest.raises(SpadeError, match="all 4 were unpaired"):
        find_pairs(DataConfig(root=str(tmp_path), skip_bad=True), problems=[])


def test_max_samples_keeps_the_first_by_name(tmp_path: Path) -> None:
    make_flat(tmp_path, n=5, instances=False)
    samples = find_pairs(DataConfig(root=str(tmp_path), max_samples=2))
    assert [s.name for s in samples] == ["000000", "000001"]
    assert len(find_pairs(DataConfig(root=str(tmp_path), max_samples=50))) == 5


def test_coco_stuff_sample(coco_sample: Path) -> None:
    for split in ("train", "val"):
        if not (coco_sample / f"{split}_label").is_dir():
            continue
        labels = sorted(p.stem for p in (coco_sample / f"{split}_label").glob("*.png"))
        samples = find_pairs(DataConfig(layout="coco", root=str(coco_sample), split=split))
        assert [s.name for s in samples] == labels
        assert all(s.image.suffix == ".jpg" and s.instance is not None for s in samples)
        assert all(s.image.stem == s.label.stem == s.instance.stem for s in samples)


def test_orphan_instances_are_ignored(tmp_path: Path) -> None:
    make_flat(tmp_path, n=2)
    save_ids(tmp_path / "train_inst" / "zzz.png", block_sample(0)[0])
    assert [s.name for s in find_pairs(DataConfig(root=str(tmp_path)))] == ["000000", "000001"]
