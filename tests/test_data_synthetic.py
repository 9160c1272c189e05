from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade.data import synthetic
from spade.data.synthetic import (
    CLASS_NAMES,
    generate_builtin_dataset,
    read_class_names,
    render_scene,
)
from spade.errors import SpadeError

SKY, CLOUD, MOUNTAIN, WATER, GRASS, TREE, SAND, ROCK = range(8)
GROUND = (WATER, GRASS, TREE, SAND, ROCK)
SMALL = dict(count=12, val_count=4, size=32, seed=3, progress=False)


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    return [render_scene(np.random.default_rng([0, 0, i]), 64) for i in range(50)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_builtin_dataset(tmp_path_factory.mktemp("builtin") / "landscapes", **SMALL)


# --------------------------------------------------------------------------- scenes


@pytest.mark.parametrize("size", [16, 64, 128])
def test_render_scene_shapes(size: int) -> None:
    labels, image = render_scene(np.random.default_rng(1), size)
    assert labels.shape == (size, size) and labels.dtype == np.uint8
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert labels.max() < len(CLASS_NAMES)


def test_render_scene_is_deterministic() -> None:
    a = render_scene(np.random.default_rng([5, 0, 2]), 64)
    b = render_scene(np.random.default_rng([5, 0, 2]), 64)
    c = render_scene(np.random.default_rng([6, 0, 2]), 64)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])


def test_class_names() -> None:
    assert CLASS_NAMES == ("sky", "cloud", "mountain", "water", "grass", "tree", "sand", "rock")


def test_scenes_are_varied_landscapes(scenes: list[tuple[np.ndarray, np.ndarray]]) -> None:
    present = np.array([np.bincount(lab.ravel(), minlength=8) > 0 for lab, _ in scenes])
    # Every class shows up in at least 10 of 50 scenes, and no non-sky class is in all of them.
    assert present.sum(0).min() >= 10, dict(zip(CLASS_NAMES, present.sum(0), strict=True))
    assert present[:, 1:].sum(0).max() < 50
    assert min(present.sum(1)) >= 2
    assert len({tuple(row) for row in present}) >= 15  # many different class combinations

    for lab, _ in scenes:
        assert set(np.unique(lab[0])) <= {SKY, CLOUD}  # the top row is sky (with clouds)
        assert set(np.unique(lab[-1])) <= set(GROUND)  # the bottom row is ground
    top_band_sky = [np.mean(lab[:6] == SKY) for lab, _ in scenes]
    assert np.mean(top_band_sky) > 0.6 and np.mean([s > 0 for s in top_band_sky]) >= 0.9

    # The horizon (first row holding ground) moves from scene to scene.
    first_ground = [np.argmax(np.isin(lab, GROUND).any(1)) for lab, _ in scenes]
    assert np.ptp(first_ground) >= 12 and np.std(first_ground) >= 4


def test_trees_stand_on_the_ground(scenes: list[tuple[np.ndarray, np.ndarray]]) -> None:
    below = []
    for lab, _ in scenes:
        tree = lab == TREE
        # The pixel under the lowest tree pixel of each column; crowns near the horizon may overhang the sky.
        cols = np.flatnonzero(tree.any(0))
        bottoms = tree.shape[0] - 1 - np.argmax(tree[::-1, cols], axis=0)
        below += [lab[b + 1, c] in GROUND for b, c in zip(bottoms, cols, strict=True) if b + 1 < lab.shape[0]]
    assert len(below) > 200 and np.mean(below) > 0.95
    assert sum((lab == TREE).any() for lab, _ in scenes) >= 20


def test_image_depends_on_label(scenes: list[tuple[np.ndarray, np.ndarray]]) -> None:
    pixels = {c: np.concatenate([img[lab == c] for lab, img in scenes]).astype(float) for c in range(8)}
    mean = {c: p.mean(0) for c, p in pixels.items()}
    # Mean colours over 50 scenes are at least 60 (of 255) apart in RGB for sky, water, grass, sand and tree,
    # except the two greens: trees are a darker green than grass, at least 35 apart.
    for a, b in itertools.combinations((SKY, WATER, GRASS, SAND, TREE), 2):
        margin = 35 if {a, b} == {GRASS, TREE} else 60
        assert np.linalg.norm(mean[a] - mean[b]) > margin, (CLASS_NAMES[a], CLASS_NAMES[b], mean[a], mean[b])
    assert mean[TREE].mean() < mean[GRASS].mean() - 15
    r, g, b = mean[SKY]
    assert b > r + 30 and b > g
    r, g, b = mean[GRASS]
    assert g > r + 25 and g > b + 25
    r, g, b = mean[WATER]
    assert b > r + 25
    assert mean[CLOUD].mean() > mean[SKY].mean() + 25  # clouds are brighter than the sky around them
    assert mean[SAND].mean() > mean[ROCK].mean() + 40


def test_classes_have_texture(scenes: list[tuple[np.ndarray, np.ndarray]]) -> None:
    def stds(cls: int) -> list[float]:
        out = []
        for lab, img in scenes:
            m = lab == cls
            if m.sum() >= 50:
                out.append(float(img[m].astype(float).mean(1).std()))
        return out

    # Luminance std within a class in one scene, in grey levels of 255.
    assert min(stds(GRASS)) > 5 and min(stds(ROCK)) > 8
    assert np.median(stds(ROCK)) > 15 and np.median(stds(WATER)) > 8
    assert np.median(stds(CLOUD)) < np.median(stds(ROCK))


def test_same_scene_at_every_resolution() -> None:
    agree = []
    for i in range(10):
        small, _ = render_scene(np.random.default_rng([0, 0, i]), 64)
        large, _ = render_scene(np.random.default_rng([0, 0, i]), 128)
        agree.append(np.mean(small == large[::2, ::2]))
    assert np.mean(agree) > 0.9


# --------------------------------------------------------------------------- files


def test_layout_and_file_counts(dataset: Path) -> None:
    assert sorted(p.name for p in dataset.iterdir()) == [
        "classes.txt",
        "dataset.json",
        "train_img",
        "train_label",
        "val_img",
        "val_label",
    ]
    for split, n in (("train", 12), ("val", 4)):
        names = [f"{i:06d}" for i in range(n)]
        assert sorted(p.name for p in (dataset / f"{split}_label").iterdir()) == [f"{s}.png" for s in names]
        assert sorted(p.name for p in (dataset / f"{split}_img").iterdir()) == [f"{s}.jpg" for s in names]


def test_files_hold_ids_and_photos(dataset: Path) -> None:
    seen = set()
    for path in sorted((dataset / "train_label").iterdir()):
        with Image.open(path) as lab:
            assert lab.mode == "L" and lab.size == (32, 32)
            ids = np.asarray(lab)
        assert ids.max() <= 7
        seen |= set(np.unique(ids).tolist())
        with Image.open(dataset / "train_img" / f"{path.stem}.jpg") as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32)
    assert len(seen) >= 6


def test_written_files_match_render_scene(dataset: Path) -> None:
    labels, image = render_scene(np.random.default_rng([3, 1, 2]), 32)  # seed 3, split val, index 2
    with Image.open(dataset / "val_label" / "000002.png") as lab:
        assert np.array_equal(np.asarray(lab), labels)
    with Image.open(dataset / "val_img" / "000002.jpg") as img:
        assert np.abs(np.asarray(img).astype(int) - image).mean() < 4  # JPEG at quality 95


def test_classes_txt_and_metadata(dataset: Path) -> None:
    text = (dataset / "classes.txt").read_text()
    assert text == "".join(f"{i}\t{n}\n" for i, n in enumerate(CLASS_NAMES))
    assert read_class_names(dataset) == list(CLASS_NAMES)
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta == {
        "name": "builtin-landscapes",
        "version": 1,
        "seed": 3,
        "count": 12,
        "val_count": 4,
        "size": 32,
        "classes": list(CLASS_NAMES),
    }


def test_generation_is_byte_identical(dataset: Path, tmp_path: Path) -> None:
    again = generate_builtin_dataset(tmp_path / "again", **SMALL)
    assert files_of(again) == files_of(dataset)
    other = generate_builtin_dataset(tmp_path / "other", **{**SMALL, "seed": 4})
    assert (other / "train_label" / "000000.png").read_bytes() != (dataset / "train_label" / "000000.png").read_bytes()


def test_scenes_do_not_depend_on_count(dataset: Path, tmp_path: Path) -> None:
    fewer = generate_builtin_dataset(tmp_path / "fewer", **{**SMALL, "count": 3})
    for i in range(3):
        for sub, suffix in (("train_label", "png"), ("train_img", "jpg")):
            name = f"{sub}/{i:06d}.{suffix}"
            assert (fewer / name).read_bytes() == (dataset / name).read_bytes()


def test_default_val_count(tmp_path: Path) -> None:
    root = generate_builtin_dataset(tmp_path / "d", count=20, size=16, progress=False)
    assert json.loads((root / "dataset.json").read_text())["val_count"] == 8
    assert len(list((root / "val_label").iterdir())) == 8


def test_progress_bar(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    generate_builtin_dataset(tmp_path / "d", count=2, val_count=1, size=16, progress=True)
    assert "3/3" in capfd.readouterr().err


def test_rerun_with_same_parameters_is_a_noop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = generate_builtin_dataset(tmp_path / "d", count=4, val_count=2, size=16, progress=False)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def fail(*args: object) -> None:
        raise AssertionError("a complete data set must not be rendered again")

    monkeypatch.setattr(synthetic, "render_scene", fail)
    assert generate_builtin_dataset(root, count=4, val_count=2, size=16, progress=False) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_incomplete_set_with_same_parameters_is_completed(tmp_path: Path) -> None:
    root = generate_builtin_dataset(tmp_path / "d", count=4, val_count=2, size=16, progress=False)
    reference = files_of(root)
    (root / "train_img" / "000002.jpg").unlink()
    generate_builtin_dataset(root, count=4, val_count=2, size=16, progress=False)
    assert files_of(root) == reference


def test_different_parameters_need_overwrite(tmp_path: Path) -> None:
    root = generate_builtin_dataset(tmp_path / "d", count=6, val_count=2, size=16, progress=False)
    with pytest.raises(SpadeError, match="different parameters.*overwrite"):
        generate_builtin_dataset(root, count=6, val_count=2, size=16, seed=1, progress=False)
    with pytest.raises(SpadeError, match="overwrite"):
        generate_builtin_dataset(root, count=6, val_count=2, size=32, progress=False)

    generate_builtin_dataset(root, count=3, val_count=1, size=16, seed=1, overwrite=True, progress=False)
    fresh = generate_builtin_dataset(tmp_path / "fresh", count=3, val_count=1, size=16, seed=1, progress=False)
    assert files_of(root) == files_of(fresh)  # stale files of the larger set are gone


def test_foreign_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SpadeError, match="not empty"):
        generate_builtin_dataset(tmp_path, count=2, size=16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpadeError, match="not a folder"):
        generate_builtin_dataset(tmp_path / "file", count=2, size=16, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(count=0), "count must be"),
        (dict(count=-3), "count must be"),
        (dict(size=24), "multiple of 16"),
        (dict(size=8), "multiple of 16"),
        (dict(size=64.0), "multiple of 16"),
        (dict(seed=-1), "seed must be"),
        (dict(val_count=-1), "val_count must be"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(SpadeError, match=message):
        generate_builtin_dataset(tmp_path / "d", **{"count": 2, "size": 16, "progress": False, **kwargs})
    assert not (tmp_path / "d").exists()


def test_interrupted_run_leaves_only_whole_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = Image.Image.save
    calls = 0

    def flaky_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 7:  # die half-way through writing a file
            fp.write(b"partial")  # type: ignore[attr-defined]
            raise KeyboardInterrupt
        real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    root = tmp_path / "d"
    with pytest.raises(KeyboardInterrupt):
        generate_builtin_dataset(root, count=6, val_count=2, size=16, progress=False)
    monkeypatch.undo()

    written = [p for p in root.rglob("*") if p.is_file()]
    assert not (root / "dataset.json").exists()  # the set is not marked complete
    assert not [p for p in written if p.name.startswith(".")]  # no temp files left behind
    assert len([p for p in written if p.suffix in (".png", ".jpg")]) == 6
    for p in written:
        if p.suffix in (".png", ".jpg"):
            with Image.open(p) as img:
                img.load()  # every file that exists is whole

    generate_builtin_dataset(root, count=6, val_count=2, size=16, progress=False)
    fresh = generate_builtin_dataset(tmp_path / "fresh", count=6, val_count=2, size=16, progress=False)
    assert files_of(root) == files_of(fresh)


def test_read_class_names_errors(tmp_path: Path) -> None:
    with pytest.raises(SpadeError, match="classes.txt: no such file"):
        read_class_names(tmp_path)
    (tmp_path / "classes.txt").write_text("0\tsky\n1 cloud\n")
    with pytest.raises(SpadeError, match=r"classes.txt:2: expected 'id<TAB>name'"):
        read_class_names(tmp_path)
    (tmp_path / "classes.txt").write_text("0\tsky\n2\tcloud\n")
    with pytest.raises(SpadeError, match="in order"):
        read_class_names(tmp_path)
    (tmp_path / "classes.txt").write_text("0\tsky\n1\tsea water\n\n")
    assert read_class_names(tmp_path) == ["sky", "sea water"]
