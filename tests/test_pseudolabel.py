from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade.config import DataConfig, ModelConfig
from spade.data.dataset import build_dataset, read_photo
from spade.data.synthetic import CLASS_COLORS, CLASS_NAMES, generate_builtin_dataset, read_class_names
from spade.errors import SpadeError
from spade.evaluate.segmenters.base import Segmentation
from spade.pseudolabel import PseudolabelReport, find_photos, pseudolabel

TESTS = Path(__file__).parent
N_PHOTOS = 10
SIZE = 32


class NearestColourSegmenter:
    """A deterministic stand-in for a network: each pixel gets the class whose preview colour is nearest.

    The confidence is the winning class's softmax probability over negative colour distances.
    `segmented` counts the photos it was given.
    """

    name = "nearest-colour"
    num_classes = len(CLASS_NAMES)
    class_names = list(CLASS_NAMES)

    def __init__(self) -> None:
        self.segmented = 0
        self.colours = np.asarray(CLASS_COLORS, dtype=np.float32)

    def segment(self, photos: list[np.ndarray]) -> list[Segmentation]:
        self.segmented += len(photos)
        results = []
        for photo in photos:
            assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3
            dist = np.linalg.norm(photo[:, :, None, :].astype(np.float32) - self.colours, axis=-1)
            logits = -dist / 25.0
            prob = np.exp(logits - logits.max(axis=-1, keepdims=True))
            prob /= prob.sum(axis=-1, keepdims=True)
            results.append(Segmentation(labels=dist.argmin(-1).astype(np.int64), confidence=prob.max(-1)))
        return results


def manifest_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def by_stem(out: Path) -> dict[str, dict]:
    return {r["stem"]: r for r in manifest_lines(out)}


@pytest.fixture(scope="module")
def builtin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_builtin_dataset(
        tmp_path_factory.mktemp("builtin") / "landscapes", count=N_PHOTOS, val_count=0, size=SIZE, progress=False
    )


@pytest.fixture
def photos(builtin: Path, tmp_path: Path) -> Path:
    """A fresh copy of the built-in data set's photos: 000000.jpg ... 000009.jpg."""
    return Path(shutil.copytree(builtin / "train_img", tmp_path / "photos"))


def run(photos: Path, out: Path, segmenter: NearestColourSegmenter | None = None, **kwargs) -> PseudolabelReport:
    return pseudolabel(photos, out, segmenter or NearestColourSegmenter(), progress=False, **kwargs)


def test_output_is_a_custom_dataset_that_trains(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    segmenter = NearestColourSegmenter()
    report = run(photos, out, segmenter, batch_size=4)
    assert (report.total, report.written, report.skipped_existing, report.low_confidence, report.unreadable) == (
        N_PHOTOS,
        N_PHOTOS,
        0,
        0,
        0,
    )
    assert segmenter.segmented == N_PHOTOS and report.elapsed_s > 0
    assert f"{N_PHOTOS} photo(s): {N_PHOTOS} labelled" in report.summary()

    stems = [f"{i:06d}" for i in range(N_PHOTOS)]
    assert sorted(p.name for p in (out / "train_label").iterdir()) == [f"{s}.png" for s in stems]
    assert sorted(p.name for p in (out / "train_img").iterdir()) == [f"{s}.jpg" for s in stems]
    link = out / "train_img" / "000003.jpg"
    assert link.is_symlink() and link.resolve() == (photos / "000003.jpg").resolve()
    assert read_class_names(out) == list(CLASS_NAMES)

    with Image.open(out / "train_label" / "000003.png") as img:
        assert img.mode == "L"
        stored = np.asarray(img)
    expected = NearestColourSegmenter().segment([np.asarray(read_photo(photos / "000003.jpg"))])[0].labels
    assert np.array_equal(stored, expected)

    model = ModelConfig.from_preset(
        "custom", label_nc=8, contain_dontcare_label=False, use_instance=False, crop_size=SIZE
    )
    dataset = build_dataset(
        DataConfig(layout="custom", root=str(out), load_size=SIZE), model, train=True, progress=False
    )
    assert len(dataset) == N_PHOTOS and dataset.skipped == []
    item = dataset[3]
    assert (
        item["name"] == "000003" and item["label"].shape == (1, SIZE, SIZE) and item["image"].shape == (3, SIZE, SIZE)
    )


def test_manifest_describes_every_photo(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(photos, out, batch_size=3)
    lines = manifest_lines(out)
    assert [r["stem"] for r in lines] == [f"{i:06d}" for i in range(N_PHOTOS)]
    for record in lines:
        assert record["status"] == "ok" and record["split"] == "train" and record["segmenter"] == "nearest-colour"
        assert record["file"] == f"{record['stem']}.jpg"
        assert (record["width"], record["height"]) == (SIZE, SIZE)
        assert 0.0 <= record["mean_confidence"] <= 1.0
        histogram = {int(k): v for k, v in record["histogram"].items()}
        assert sum(histogram.values()) == SIZE * SIZE and all(v > 0 for v in histogram.values())
        labels = np.asarray(Image.open(out / "train_label" / f"{record['stem']}.png"))
        assert histogram == {int(c): int(n) for c, n in zip(*np.unique(labels, return_counts=True), strict=True)}
        assert "error" not in record


def test_min_confidence_keeps_doubtful_photos_out_of_the_dataset(photos: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    run(photos, reference)
    confidence = {r["stem"]: r["mean_confidence"] for r in manifest_lines(reference)}
    threshold = float(np.median(list(confidence.values())))
    low = {s for s, c in confidence.items() if c < threshold}
    assert 0 < len(low) < N_PHOTOS

    out = tmp_path / "out"
    report = run(photos, out, min_confidence=threshold, split="val", link_images=False)
    assert (report.written, report.low_confidence) == (N_PHOTOS - len(low), len(low))
    records = by_stem(out)
    assert {s for s, r in records.items() if r["status"] == "low_confidence"} == low
    assert all(r["mean_confidence"] == confidence[s] and r["split"] == "val" for s, r in records.items())
    kept = sorted(set(confidence) - low)
    assert sorted(p.stem for p in (out / "val_label").iterdir()) == kept
    assert sorted(p.stem for p in (out / "val_img").iterdir()) == kept
    assert not any(p.is_symlink() for p in (out / "val_img").iterdir())  # copies
    model = ModelConfig.from_preset(
        "custom", label_nc=8, contain_dontcare_label=False, use_instance=False, crop_size=32
    )
    dataset = build_dataset(DataConfig(root=str(out), split="val", load_size=32), model, train=False, progress=False)
    assert [s.name for s in dataset.samples] == kept

    # A raised threshold is applied from the manifest without segmenting again; a lowered one re-segments.
    segmenter = NearestColourSegmenter()
    stricter = max(confidence.values())
    report = run(photos, out, segmenter, min_confidence=stricter, split="val", link_images=False)
    assert segmenter.segmented == 0 and report.low_confidence == N_PHOTOS - 1 and report.skipped_existing == 1
    assert len(list((out / "val_label").iterdir())) == 1
    report = run(photos, out, segmenter, split="val", link_images=False)
    assert segmenter.segmented == N_PHOTOS - 1 and report.written == N_PHOTOS - 1 and report.skipped_existing == 1
    assert len(list((out / "val_label").iterdir())) == N_PHOTOS
    assert len(manifest_lines(out)) == N_PHOTOS


def test_unreadable_photos_are_listed_and_skipped(photos: Path, tmp_path: Path) -> None:
    data = (photos / "000002.jpg").read_bytes()
    (photos / "000002.jpg").write_bytes(data[: len(data) // 2])  # a truncated JPEG
    (photos / "notes.png").write_text("not an image")
    (photos / "readme.txt").write_text("not a photo, not listed")
    out = tmp_path / "out"
    report = run(photos, out, batch_size=4)
    assert (report.total, report.written, report.unreadable) == (N_PHOTOS + 1, N_PHOTOS - 1, 2)
    records = by_stem(out)
    assert set(records) == {f"{i:06d}" for i in range(N_PHOTOS)} | {"notes"}
    for stem in ("000002", "notes"):
        assert records[stem]["status"] == "unreadable"
        assert "cannot read image" in records[stem]["error"] and stem in records[stem]["error"]
        assert not (out / "train_label" / f"{stem}.png").exists()
    assert len(list((out / "train_img").iterdir())) == N_PHOTOS - 1

    # Fixed files are picked up by the next run; finished ones are not segmented again.
    (photos / "000002.jpg").write_bytes(data)
    segmenter = NearestColourSegmenter()
    report = run(photos, out, segmenter)
    assert (report.written, report.skipped_existing, report.unreadable, segmenter.segmented) == (1, N_PHOTOS - 1, 1, 1)
    assert by_stem(out)["000002"]["status"] == "ok" and "error" not in by_stem(out)["000002"]


KILLED_RUN = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_pseudolabel import NearestColourSegmenter
from spade.pseudolabel import pseudolabel

real_replace, labels_moved = os.replace, []

def replace(src, dst):
    # die like `kill -9` just before the 5th label file would be renamed into place
    if Path(dst).parent.name == "train_label":
        labels_moved.append(dst)
        if len(labels_moved) == 5:
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)

os.replace = replace
pseudolabel({photos!r}, {out!r}, NearestColourSegmenter(), batch_size=2, progress=False)
"""


def test_resume_after_kill(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = textwrap.dedent(KILLED_RUN).format(tests=str(TESTS), photos=str(photos), out=str(out))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr

    first = by_stem(out)
    assert 4 <= len(first) < N_PHOTOS and all(r["status"] == "ok" for r in first.values())
    assert list((out / "train_label").glob(".tmp-*")), "the kill should leave a half-written file behind"
    mtimes = {s: (out / "train_label" / f"{s}.png").stat().st_mtime_ns for s in first}

    segmenter = NearestColourSegmenter()
    report = run(photos, out, segmenter, batch_size=2)
    assert segmenter.segmented == N_PHOTOS - len(first)
    assert (report.skipped_existing, report.written) == (len(first), N_PHOTOS - len(first))
    lines = manifest_lines(out)
    assert sorted(r["stem"] for r in lines) == [f"{i:06d}" for i in range(N_PHOTOS)]
    assert all(r["status"] == "ok" for r in lines)
    assert {s: (out / "train_label" / f"{s}.png").stat().st_mtime_ns for s in first} == mtimes
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    assert len(list((out / "train_label").iterdir())) == len(list((out / "train_img").iterdir())) == N_PHOTOS

    # A torn last line (killed mid-write) and repeated lines are tolerated and compacted away.
    with open(out / "manifest.jsonl", "a") as fh:
        fh.write(json.dumps(lines[0]) + "\n" + '{"split": "train", "stem": "0000')
    segmenter = NearestColourSegmenter()
    assert run(photos, out, segmenter).skipped_existing == N_PHOTOS and segmenter.segmented == 0
    assert manifest_lines(out) == lines


def test_duplicate_stems_are_rejected_before_starting(photos: Path, tmp_path: Path) -> None:
    shutil.copy(photos / "000001.jpg", photos / "000001.png")
    (photos / "sub").mkdir()
    shutil.copy(photos / "000004.jpg", photos / "sub" / "000004.jpg")
    out = tmp_path / "out"
    with pytest.raises(SpadeError, match=r"000001: 000001\.jpg, 000001\.png") as info:
        run(photos, out)
    assert "000004" not in str(info.value)  # sub/ is only read with recursive=True
    assert not out.exists()
    with pytest.raises(SpadeError, match=r"000004: 000004\.jpg, sub/000004\.jpg"):
        run(photos, out, recursive=True)


def test_recursive_walk_skips_the_output_folder(photos: Path) -> None:
    (photos / "more").mkdir()
    shutil.move(photos / "000009.jpg", photos / "more" / "000009.jpg")
    out = photos / "labelled"
    report = run(photos, out, recursive=True)
    assert report.total == N_PHOTOS and by_stem(out)["000009"]["file"] == "more/000009.jpg"
    assert [p.name for p in find_photos(photos, recursive=True, exclude=out)][-1] == "000009.jpg"
    assert run(photos, out, recursive=True).skipped_existing == N_PHOTOS


def test_every_image_suffix_the_training_stage_reads_is_a_photo(photos: Path, tmp_path: Path) -> None:
    """TIFF photos are labelled (the training stage reads them: spade.data.suffixes); a GIF is not a photo."""
    with Image.open(photos / "000002.jpg") as img:
        img.save(photos / "000002.tif")
        img.save(photos / "000003.gif")
    (photos / "000002.jpg").unlink()
    (photos / "000003.jpg").unlink()
    assert [p.name for p in find_photos(photos)][1:3] == ["000001.jpg", "000002.tif"]
    out = tmp_path / "out"
    assert run(photos, out).written == N_PHOTOS - 1
    assert (out / "train_img" / "000002.tif").is_symlink() and (out / "train_label" / "000002.png").is_file()
    model = ModelConfig.from_preset(
        "custom", label_nc=8, contain_dontcare_label=False, use_instance=False, crop_size=SIZE
    )
    data = DataConfig(layout="custom", root=str(out), load_size=SIZE)
    dataset = build_dataset(data, model, train=True, progress=False)
    assert len(dataset) == N_PHOTOS - 1 and dataset[2]["image"].shape == (3, SIZE, SIZE)


def test_a_replaced_photo_is_labelled_again(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(photos, out, link_images=False)
    Image.open(photos / "000005.jpg").save(photos / "000005.png")
    (photos / "000005.jpg").unlink()
    segmenter = NearestColourSegmenter()
    report = run(photos, out, segmenter, link_images=False)
    assert (segmenter.segmented, report.written, report.skipped_existing) == (1, 1, N_PHOTOS - 1)
    assert sorted(p.name for p in (out / "train_img").glob("000005.*")) == ["000005.png"]
    assert by_stem(out)["000005"]["file"] == "000005.png" and len(manifest_lines(out)) == N_PHOTOS
    assert (out / "train_img" / "000005.png").read_bytes() == (photos / "000005.png").read_bytes()


def test_files_follow_the_umask(photos: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        run(photos, tmp_path / "out")
    finally:
        os.umask(old)
    for path in ("manifest.jsonl", "classes.txt", "train_label/000000.png"):
        assert stat.S_IMODE((tmp_path / "out" / path).stat().st_mode) == 0o644, path


class ManyClasses:
    name = "many"
    class_names = None

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def segment(self, photos: list[np.ndarray]) -> list[Segmentation]:
        return [
            Segmentation(np.full(p.shape[:2], self.num_classes - 1, np.int64), np.ones(p.shape[:2], np.float32))
            for p in photos
        ]


def test_more_than_256_classes_give_16_bit_labels(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    pseudolabel(photos, out, ManyClasses(300), progress=False)
    with Image.open(out / "train_label" / "000000.png") as img:
        assert img.mode.startswith("I")
        assert np.asarray(img).max() == 299
    assert not (out / "classes.txt").exists()
    with pytest.raises(SpadeError, match="70000 classes"):
        pseudolabel(photos, tmp_path / "other", ManyClasses(70000), progress=False)


def test_refuses_to_mix_or_overwrite(photos: Path, builtin: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    shutil.copytree(builtin, dataset)
    with pytest.raises(SpadeError, match="not a pseudo-labelling output folder"):
        run(photos, dataset)
    out = tmp_path / "out"
    run(photos, out)
    with pytest.raises(SpadeError, match="labelled by nearest-colour, this run uses many"):
        pseudolabel(photos, out, ManyClasses(8), progress=False)
    with pytest.raises(SpadeError, match="min_confidence must lie in"):
        run(photos, out, min_confidence=1.5)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(SpadeError, match="no photos .* found; subfolders are read with recursive=True"):
        run(tmp_path / "nothing", tmp_path / "empty")
