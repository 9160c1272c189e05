"""Pseudo-labelling: a folder of photos -> a `custom`-layout dataset labelled by a segmenter.

After a run, OUT holds::

    OUT/{split}_label/STEM.png   class ids (uint8; 16-bit when the segmenter has more than 256 classes)
    OUT/{split}_img/STEM.ext     the photo: a symlink to it, or a copy with link_images=False
    OUT/classes.txt              "id<TAB>name" per class, when the segmenter names its classes
    OUT/manifest.jsonl           one JSON object per photo (see below)

so the training stage reads it directly (data.layout=custom, data.root=OUT). Labels come
from the photo exactly as the training stage decodes it (`spade.data.dataset.read_photo`).

Each manifest line describes one photo: split, file (relative to the photo folder), stem,
status, width, height, mean_confidence, histogram (class id -> pixel count, non-zero only),
segmenter, and error for unreadable photos. Status is one of

- ok: the label map and the photo are in the dataset folders;
- low_confidence: the mean confidence is below `min_confidence`; nothing in the dataset
  folders, so training never sees the photo;
- unreadable: the file could not be decoded (the error says why); retried on the next run.

A run can be killed at any moment and started again with the same arguments: files are
written to temporary names and renamed into place, a photo's manifest line is appended
(and flushed) only once its files are in place, and photos with both a manifest line and
a label file are not segmented again. The manifest is read tolerantly (for a photo the last
line wins; a torn last line is dropped) and rewritten compactly, one line per photo, at the
start and at the end of a run. A change of `min_confidence` is applied to finished photos
from their recorded mean confidence; photos that pass a lowered threshold are segmented again.

Label id 255 is the training stage's don't-care value, so segmenters with 256 or more
classes cannot use it as a class.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from spade.data.dataset import read_photo
from spade.data.layouts import describe_problems
from spade.data.suffixes import IMAGE_SUFFIXES
from spade.errors import SpadeError
from spade.evaluate.segmenters.base import Segmentation, Segmenter
from spade.progress import progress_bar

SPLITS = ("train", "val")
MANIFEST_NAME = "manifest.jsonl"
CLASSES_NAME = "classes.txt"
OK, LOW_CONFIDENCE, UNREADABLE = "ok", "low_confidence", "unreadable"
MAX_8BIT_CLASSES = 256
MAX_CLASSES = 65535
_TEMP_PREFIX = ".tmp-"


@dataclass
class PseudolabelReport:
    """What a run did. total = written + skipped_existing + low_confidence + unreadable."""

    out: Path
    total: int = 0
    written: int = 0  # labelled in this run
    skipped_existing: int = 0  # labelled by an earlier run, left as they were
    low_confidence: int = 0  # below min_confidence: listed in the manifest only
    unreadable: int = 0  # could not be decoded: listed in the manifest with the error
    elapsed_s: float = 0.0

    @property
    def manifest(self) -> Path:
        return self.out / MANIFEST_NAME

    def summary(self) -> str:
        return (
            f"pseudolabel: {self.total} photo(s): {self.written} labelled, {self.skipped_existing} already done, "
            f"{self.low_confidence} low confidence, {self.unreadable} unreadable in {self.elapsed_s:.1f}s; "
            f"dataset in {self.out}, details in {self.manifest}"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "out": str(self.out)}


def find_photos(images: str | Path, *, recursive: bool = False, exclude: str | Path | None = None) -> list[Path]:
    """The photos (IMAGE_SUFFIXES: png, jpg, bmp, tif, webp, ...) of a folder, sorted by path; hidden ones skipped.

    Two photos with the same stem (a.jpg and a.png, or sub/a.jpg beside a.jpg when
    recursive) raise a SpadeError naming them, since both would become the sample `a`.
    Files under `exclude` (e.g. the output folder) are left out.
    """
    root = Path(images)
    if not root.is_dir():
        raise SpadeError(f"photo folder not found: {root}")
    skip = Path(exclude).resolve() if exclude is not None else None
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if recursive and not d.startswith(".") and (here / d).resolve() != skip)
        found.extend(
            here / f
            for f in files
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES and (here / f).is_file()
        )
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    by_stem: dict[str, list[Path]] = {}
    for path in found:
        by_stem.setdefault(path.stem, []).append(path)
    repeated = [
        f"{stem}: {', '.join(p.relative_to(root).as_posix() for p in paths)}"
        for stem, paths in by_stem.items()
        if len(paths) > 1
    ]
    if repeated:
        raise SpadeError(
            describe_problems(
                f"{len(repeated)} name(s) under {root} are used by several photos; each would be the same sample:",
                repeated,
                "Rename or remove all but one photo of each name.",
            )
        )
    return found


def pseudolabel(
    images: str | Path,
    out: str | Path,
    segmenter: Segmenter,
    *,
    batch_size: int = 8,
    min_confidence: float = 0.0,
    split: str = "train",
    link_images: bool = True,
    recursive: bool = False,
    progress: bool = True,
) -> PseudolabelReport:
    """Label every photo of `images` with `segmenter` into the custom-layout dataset `out` (see the module doc).

    Photos whose mean confidence is below `min_confidence` (0..1) are listed in the manifest
    as low_confidence and kept out of the dataset; unreadable photos are listed and skipped.
    Re-running with the same arguments continues an interrupted run. Returns the counts.
    """
    started = time.monotonic()
    images, out = Path(images), Path(out)
    _check_arguments(segmenter, batch_size=batch_size, min_confidence=min_confidence, split=split)
    photos = find_photos(images, recursive=recursive, exclude=out)
    if not photos:
        hint = "" if recursive else "; subfolders are read with recursive=True (--recursive)"
        raise SpadeError(f"{images}: no photos ({', '.join(IMAGE_SUFFIXES)}) found{hint}")

    label_dir, img_dir = out / f"{split}_label", out / f"{split}_img"
    manifest_path = out / MANIFEST_NAME
    _refuse_foreign_folder(manifest_path, label_dir, img_dir)
    label_dir.mkdir(parents=True, exist_ok=True)
    img_dir.mkdir(parents=True, exist_ok=True)
    for folder in (out, label_dir, img_dir):
        _remove_temp_files(folder)
    records = _load_manifest(manifest_path)
    _check_same_segmenter(records, segmenter, manifest_path)
    _write_classes(out / CLASSES_NAME, segmenter)
    _write_manifest(manifest_path, records)

    labels_present = {p.stem for p in _plain_files(label_dir) if p.suffix == ".png"}
    images_present: dict[str, list[Path]] = {}
    for p in _plain_files(img_dir):
        images_present.setdefault(p.stem, []).append(p)
    writer = _DatasetWriter(label_dir, img_dir, images_present, link_images, segmenter.num_classes > MAX_8BIT_CLASSES)

    report = PseudolabelReport(out=out, total=len(photos))
    todo: list[tuple[Path, str]] = []
    with (
        open(manifest_path, "a", encoding="utf-8") as manifest,
        ThreadPoolExecutor(min(8, 2 * (os.cpu_count() or 1))) as pool,
        progress_bar(
            total=len(photos), desc=f"pseudolabel ({segmenter.name})", unit="photo", disable=not progress
        ) as bar,
    ):

        def log(record: dict) -> None:
            records[(split, record["stem"])] = record
            manifest.write(json.dumps(record) + "\n")
            manifest.flush()

        for photo in photos:
            file = photo.relative_to(images).as_posix()
            old = records.get((split, photo.stem))
            earlier = _earlier_result(old, file, photo.stem in labels_present, min_confidence)
            if earlier is None:
                todo.append((photo, file))
                continue
            if earlier == OK:
                writer.ensure_image(photo)
                report.skipped_existing += 1
            else:
                writer.remove(photo.stem)
                if old["status"] != LOW_CONFIDENCE:  # a raised threshold demotes without segmenting again
                    log({**old, "status": LOW_CONFIDENCE})
                report.low_confidence += 1
            bar.update()

        for batch in _read_ahead(pool, todo, batch_size):
            readable = [(photo, file, arr) for photo, file, arr in batch if isinstance(arr, np.ndarray)]
            for photo, file, loaded in batch:
                if isinstance(loaded, str):
                    writer.remove(photo.stem)
                    log(_record(split, file, photo.stem, UNREADABLE, segmenter, error=loaded))
                    report.unreadable += 1
            labelled = _segment(segmenter, readable, split, min_confidence)
            # Files first (in parallel), then the manifest lines: a line always means its files are in place.
            for _ in pool.map(lambda item: writer.place(item[0], item[1], item[2]["status"] == OK), labelled):
                pass
            for _, _, record in labelled:
                log(record)
                if record["status"] == OK:
                    report.written += 1
                else:
                    report.low_confidence += 1
            bar.update(len(batch))
            bar.set_postfix(
                written=report.written, low=report.low_confidence, unreadable=report.unreadable, refresh=False
            )

    _write_manifest(manifest_path, records)
    report.elapsed_s = time.monotonic() - started
    return report


def _earlier_result(old: dict | None, file: str, has_label: bool, min_confidence: float) -> str | None:
    """OK or LOW_CONFIDENCE when an earlier run's result for the photo still holds, None when it must be segmented.

    A recorded photo keeps its result under a changed `min_confidence` as long as that
    needs no label map it lacks: ok photos can be demoted, low-confidence ones are
    segmented again when they now pass.
    """
    if old is None or old.get("file") != file or not isinstance(old.get("mean_confidence"), int | float):
        return None
    passes = old["mean_confidence"] >= min_confidence
    if old.get("status") == OK and has_label:
        return OK if passes else LOW_CONFIDENCE
    if old.get("status") == LOW_CONFIDENCE and not passes:
        return LOW_CONFIDENCE
    return None


def _segment(
    segmenter: Segmenter, readable: list[tuple[Path, str, np.ndarray]], split: str, min_confidence: float
) -> list[tuple[Path, np.ndarray, dict]]:
    """(photo, class ids, manifest record) for each decoded photo, its status decided by its mean confidence."""
    if not readable:
        return []
    results = segmenter.segment([arr for _, _, arr in readable])
    if len(results) != len(readable):
        raise SpadeError(f"segmenter {segmenter.name} returned {len(results)} result(s) for {len(readable)} photo(s)")
    labelled = []
    for (photo, file, arr), seg in zip(readable, results, strict=True):
        labels, mean_conf = _checked(seg, arr.shape[:2], photo, segmenter)
        histogram = np.bincount(labels.reshape(-1), minlength=segmenter.num_classes)
        record = _record(
            split,
            file,
            photo.stem,
            OK if mean_conf >= min_confidence else LOW_CONFIDENCE,
            segmenter,
            width=int(arr.shape[1]),
            height=int(arr.shape[0]),
            mean_confidence=mean_conf,
            histogram={str(i): int(c) for i, c in enumerate(histogram) if c},
        )
        labelled.append((photo, labels, record))
    return labelled


# --------------------------------------------------------------------------- checks


def _check_arguments(segmenter: Segmenter, *, batch_size: int, min_confidence: float, split: str) -> None:
    problems = []
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(min_confidence, int | float) or not 0.0 <= min_confidence <= 1.0:
        problems.append(f"min_confidence must lie in [0, 1], got {min_confidence!r}")
    if split not in SPLITS:
        problems.append(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    n = segmenter.num_classes
    if not 1 <= n <= MAX_CLASSES:
        problems.append(f"segmenter {segmenter.name} has {n} classes; label files hold at most {MAX_CLASSES}")
    names = segmenter.class_names
    if names is not None and len(names) != n:
        problems.append(f"segmenter {segmenter.name} names {len(names)} classes but has {n}")
    if problems:
        raise SpadeError("cannot pseudo-label: " + "; ".join(problems))


def _refuse_foreign_folder(manifest_path: Path, *folders: Path) -> None:
    """Label or image files without a manifest were not written by this stage: never overwrite them."""
    if manifest_path.exists():
        return
    for folder in folders:
        if folder.is_dir() and _plain_files(folder):
            raise SpadeError(
                f"{folder}: holds files but {manifest_path} does not exist, so this is not a pseudo-labelling "
                "output folder; choose an empty or new output folder"
            )


def _check_same_segmenter(records: dict[tuple[str, str], dict], segmenter: Segmenter, manifest_path: Path) -> None:
    others = sorted({str(r.get("segmenter")) for r in records.values()} - {segmenter.name})
    if others:
        raise SpadeError(
            f"{manifest_path}: photos were labelled by {', '.join(others)}, this run uses {segmenter.name}; "
            "labels of different segmenters must not mix: choose another output folder"
        )


def _checked(seg: Segmentation, shape: tuple[int, int], photo: Path, segmenter: Segmenter) -> tuple[np.ndarray, float]:
    """The segmentation's labels as int64 and its mean confidence, after checking the protocol."""
    labels, confidence = np.asarray(seg.labels), np.asarray(seg.confidence)
    h, w = shape
    if labels.shape != (h, w) or confidence.shape != (h, w):
        raise SpadeError(
            f"segmenter {segmenter.name} returned labels {labels.shape} and confidence {confidence.shape} for "
            f"{photo} ({w}x{h}); both must be at the photo's size ({h}, {w})"
        )
    labels = labels.astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= segmenter.num_classes):
        raise SpadeError(
            f"segmenter {segmenter.name} returned class ids {labels.min()}..{labels.max()} for {photo}; "
            f"it has {segmenter.num_classes} classes"
        )
    mean_conf = float(confidence.mean(dtype=np.float64)) if confidence.size else 0.0
    if not math.isfinite(mean_conf):
        raise SpadeError(f"segmenter {segmenter.name} returned non-finite confidences for {photo}")
    return labels, round(mean_conf, 6)


def _record(split: str, file: str, stem: str, status: str, segmenter: Segmenter, **fields: object) -> dict:
    return {"split": split, "file": file, "stem": stem, "status": status, **fields, "segmenter": segmenter.name}


# --------------------------------------------------------------------------- reading


def _load(photo: Path) -> np.ndarray | str:
    try:
        return np.asarray(read_photo(photo))
    except SpadeError as exc:
        return str(exc)


def _read_ahead(
    pool: ThreadPoolExecutor, todo: list[tuple[Path, str]], batch_size: int
) -> Iterator[list[tuple[Path, str, np.ndarray | str]]]:
    """Batches of decoded photos (or error texts); the next batch is decoded while one is being used."""

    def submit(start: int) -> list[tuple[Path, str, Future]]:
        return [(photo, file, pool.submit(_load, photo)) for photo, file in todo[start : start + batch_size]]

    pending = submit(0)
    for start in range(0, len(todo), batch_size):
        current = pending
        pending = submit(start + batch_size)
        yield [(photo, file, future.result()) for photo, file, future in current]


# --------------------------------------------------------------------------- writing


class _DatasetWriter:
    """Puts label maps and photos into the dataset folders, atomically."""

    def __init__(
        self, label_dir: Path, img_dir: Path, images: dict[str, list[Path]], link: bool, sixteen_bit: bool
    ) -> None:
        self.label_dir, self.img_dir = label_dir, img_dir
        self.images = images  # existing files of img_dir by stem
        self.link = link
        self.dtype = np.uint16 if sixteen_bit else np.uint8

    def place(self, photo: Path, labels: np.ndarray, keep: bool) -> None:
        if not keep:
            self.remove(photo.stem)
            return
        image = Image.fromarray(labels.astype(self.dtype))
        _write_atomic(self.label_dir / f"{photo.stem}.png", lambda fh: image.save(fh, format="PNG"))
        self._put_image(photo)

    def ensure_image(self, photo: Path) -> None:
        if [p.name for p in self.images.get(photo.stem, [])] != [photo.name]:
            self._put_image(photo)

    def remove(self, stem: str) -> None:
        (self.label_dir / f"{stem}.png").unlink(missing_ok=True)
        for path in self.images.pop(stem, []):
            path.unlink(missing_ok=True)

    def _put_image(self, photo: Path) -> None:
        dest = self.img_dir / photo.name
        there = os.path.lexists(dest) and dest.resolve() == photo.resolve()
        if not there or (not self.link and dest.is_symlink()):  # else: a link to it, or the photo itself
            tmp = _temp_name(dest)
            try:
                if self.link:
                    os.symlink(photo.resolve(), tmp)
                else:
                    shutil.copyfile(photo, tmp)
                os.replace(tmp, dest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        for old in self.images.get(photo.stem, []):
            if old.name != dest.name:  # the same stem with another extension, from an earlier run
                old.unlink(missing_ok=True)
        self.images[photo.stem] = [dest]


def _plain_files(folder: Path) -> list[Path]:
    with os.scandir(folder) as entries:
        return [Path(e.path) for e in entries if not e.name.startswith(".") and (e.is_file() or e.is_symlink())]


def _remove_temp_files(folder: Path) -> None:
    """Leftovers of a run killed while writing (a clean exit removes its own)."""
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(_TEMP_PREFIX):
                path.unlink(missing_ok=True)


def _temp_name(path: Path) -> Path:
    return path.with_name(f"{_TEMP_PREFIX}{secrets.token_hex(6)}{path.suffix}")


def _write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file in the same folder, then rename it into place (permissions follow umask)."""
    tmp = _temp_name(path)
    try:
        with open(tmp, "xb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def _write_classes(path: Path, segmenter: Segmenter) -> None:
    if segmenter.class_names is None:
        return
    text = "".join(f"{i}\t{name}\n" for i, name in enumerate(segmenter.class_names))
    if path.is_file():
        if path.read_text(encoding="utf-8") != text:
            raise SpadeError(
                f"{path}: lists other classes than segmenter {segmenter.name}; "
                "labels of different segmenters must not mix: choose another output folder"
            )
        return
    _write_text_atomic(path, text)


# --------------------------------------------------------------------------- manifest


def _load_manifest(path: Path) -> dict[tuple[str, str], dict]:
    """Records by (split, stem); the last line for a photo wins, torn or foreign lines are dropped."""
    records: dict[tuple[str, str], dict] = {}
    if not path.is_file():
        return records
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("stem"), str) and record.get("split") in SPLITS:
                records[(record["split"], record["stem"])] = record
    return records


def _write_manifest(path: Path, records: dict[tuple[str, str], dict]) -> None:
    ordered = sorted(records.values(), key=lambda r: (r["split"], str(r.get("file", "")), r["stem"]))
    _write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in ordered))
