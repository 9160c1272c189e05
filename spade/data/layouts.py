"""Folder conventions of the supported datasets: which label, image and instance files belong together.

- coco: root/{split}_img, root/{split}_label, root/{split}_inst (optional), paired by file stem.
- ade20k: root/images/{training,validation}, root/annotations/{training,validation}, by stem; no instances.
- cityscapes: root/leftImg8bit/{split}/<city>/*_leftImg8bit.png with root/gtFine/{split}/<city>/
  *_gtFine_labelIds.png and *_gtFine_instanceIds.png, paired by the common prefix (aachen_000000_000019).
- custom: data.label_dir / image_dir / instance_dir (relative to root unless absolute), by default
  root/{split}_label, root/{split}_img and, when it exists, root/{split}_inst.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spade.config import DataConfig
from spade.data.suffixes import IMAGE_SUFFIXES
from spade.errors import SpadeError

MAX_LISTED = 10
ADE20K_SPLITS = {"train": "training", "val": "validation"}
CITYSCAPES_IMAGE = "_leftImg8bit.png"
CITYSCAPES_LABEL = "_gtFine_labelIds.png"
CITYSCAPES_INSTANCE = "_gtFine_instanceIds.png"


@dataclass(frozen=True)
class Sample:
    """One training example: its label map, photo, optional instance map and a unique name."""

    label: Path
    image: Path
    instance: Path | None
    name: str


@dataclass
class _Side:
    """The files of one kind (labels, images or instances), keyed by sample name."""

    what: str
    folder: Path
    pattern: str  # how a partner's path is shown: {name} and {city} are filled in
    files: dict[str, list[Path]]

    def expected(self, name: str, partner: Path) -> Path:
        return self.folder / self.pattern.format(name=name, city=partner.parent.name)


def describe_problems(header: str, problems: list[str], hint: str = "") -> str:
    """A multi-line message: the header, the first problems, the count of the rest, then a hint."""
    lines = [header] + [f"  {p}" for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    if hint:
        lines.append(hint)
    return "\n".join(lines)


def find_pairs(data: DataConfig, *, problems: list[str] | None = None) -> list[Sample]:
    """The samples of `data`'s layout and split, sorted by name, at most `data.max_samples` of them.

    Files without a partner (and names used by several files) raise one SpadeError naming
    them, unless `data.skip_bad` is set: then they are dropped and described in `problems`
    (a line on stderr says how many when no list is passed).
    """
    root = Path(data.root)
    if not root.is_dir():
        raise SpadeError(f"data.root not found: {root} (data.layout={data.layout}, data.split={data.split})")
    sides = _LAYOUTS[data.layout](root, data)
    samples, found = _pair(*sides)
    if found:
        if not data.skip_bad:
            raise SpadeError(
                describe_problems(
                    f"{len(found)} file(s) under {root} have no partner (data.layout={data.layout}):",
                    found,
                    "Add the missing files or remove these, or set data.skip_bad=true to drop them.",
                )
            )
        if problems is None:
            print(f"data: dropped {len(found)} unpaired file(s) under {root} (data.skip_bad=true)", file=sys.stderr)
        else:
            problems.extend(found)
    if not samples:
        labels, images = sides[0], sides[1]
        why = f"all {len(found)} were unpaired" if found else "both folders hold no matching files"
        raise SpadeError(
            f"no samples in {root} (data.layout={data.layout}): labels looked for in {labels.folder}, "
            f"images in {images.folder}; {why}"
        )
    samples.sort(key=lambda s: s.name)
    return samples[: data.max_samples] if data.max_samples > 0 else samples


def _pair(labels: _Side, images: _Side, instances: _Side | None) -> tuple[list[Sample], list[str]]:
    problems: list[str] = []
    bad: set[str] = set()
    for side in (labels, images, instances):
        if side is None:
            continue
        for name, paths in side.files.items():
            if len(paths) > 1:
                shown = ", ".join(sorted(p.name for p in paths))
                problems.append(f"{paths[0].parent}: several {side.what} files for {name!r} ({shown}); keep one")
                bad.add(name)
    for this, other in ((labels, images), (images, labels)):
        for name in sorted(this.files.keys() - other.files.keys() - bad):
            path = this.files[name][0]
            problems.append(f"{path}: no {other.what} for it (expected {other.expected(name, path)})")
            bad.add(name)
    names = sorted((labels.files.keys() & images.files.keys()) - bad)
    if instances is not None:
        for name in names:
            if name not in instances.files:
                path = labels.files[name][0]
                problems.append(f"{path}: no {instances.what} for it (expected {instances.expected(name, path)})")
                bad.add(name)
    samples = [
        Sample(
            label=labels.files[name][0],
            image=images.files[name][0],
            instance=instances.files[name][0] if instances is not None else None,
            name=name,
        )
        for name in names
        if name not in bad
    ]
    return samples, problems


def _scan(
    folder: Path, key: Callable[[str], str | None], files: dict[str, list[Path]] | None = None
) -> dict[str, list[Path]]:
    """Plain files of `folder` (hidden ones skipped) grouped by key(file name); None keys are left out."""
    files = {} if files is None else files
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            name = key(entry.name)
            if name is not None:
                files.setdefault(name, []).append(Path(entry.path))
    return files


def _stem_of_image(file_name: str) -> str | None:
    stem, suffix = os.path.splitext(file_name)
    return stem if suffix.lower() in IMAGE_SUFFIXES else None


def _ending_with(ending: str) -> Callable[[str], str | None]:
    return lambda file_name: file_name[: -len(ending)] if file_name.endswith(ending) else None


def _need_dir(path: Path, what: str, data: DataConfig) -> Path:
    if not path.is_dir():
        raise SpadeError(f"{what} folder not found: {path} (data.layout={data.layout}, data.split={data.split})")
    return path


def _flat(what: str, folder: Path) -> _Side:
    return _Side(what, folder, "{name}.*", _scan(folder, _stem_of_image))


def _coco(root: Path, data: DataConfig) -> tuple[_Side, _Side, _Side | None]:
    labels = _flat("label map", _need_dir(root / f"{data.split}_label", "label", data))
    images = _flat("image", _need_dir(root / f"{data.split}_img", "image", data))
    inst_dir = root / f"{data.split}_inst"
    return labels, images, _flat("instance map", inst_dir) if inst_dir.is_dir() else None


def _ade20k(root: Path, data: DataConfig) -> tuple[_Side, _Side, _Side | None]:
    split = ADE20K_SPLITS[data.split]
    labels = _flat("label map", _need_dir(root / "annotations" / split, "label", data))
    images = _flat("image", _need_dir(root / "images" / split, "image", data))
    return labels, images, None


def _cityscapes(root: Path, data: DataConfig) -> tuple[_Side, _Side, _Side | None]:
    image_root = _need_dir(root / "leftImg8bit" / data.split, "image", data)
    label_root = _need_dir(root / "gtFine" / data.split, "label", data)
    images = _Side("image", image_root, "{city}/{name}" + CITYSCAPES_IMAGE, {})
    labels = _Side("label map", label_root, "{city}/{name}" + CITYSCAPES_LABEL, {})
    instances = _Side("instance map", label_root, "{city}/{name}" + CITYSCAPES_INSTANCE, {})
    for city in sorted(p for p in image_root.iterdir() if p.is_dir()):
        _scan(city, _ending_with(CITYSCAPES_IMAGE), images.files)
    for city in sorted(p for p in label_root.iterdir() if p.is_dir()):
        _scan(city, _ending_with(CITYSCAPES_LABEL), labels.files)
        _scan(city, _ending_with(CITYSCAPES_INSTANCE), instances.files)
    return labels, images, instances if instances.files else None


def _custom(root: Path, data: DataConfig) -> tuple[_Side, _Side, _Side | None]:
    def folder(value: str, default: str) -> Path:
        return root / (value or default)  # an absolute value replaces root

    labels = _flat(
        "label map", _need_dir(folder(data.label_dir, f"{data.split}_label"), "label (data.label_dir)", data)
    )
    images = _flat("image", _need_dir(folder(data.image_dir, f"{data.split}_img"), "image (data.image_dir)", data))
    inst_dir = folder(data.instance_dir, f"{data.split}_inst")
    if data.instance_dir:
        _need_dir(inst_dir, "instance (data.instance_dir)", data)
    elif not inst_dir.is_dir():
        return labels, images, None
    return labels, images, _flat("instance map", inst_dir)


_LAYOUTS: dict[str, Callable[[Path, DataConfig], tuple[_Side, _Side, _Side | None]]] = {
    "coco": _coco,
    "ade20k": _ade20k,
    "cityscapes": _cityscapes,
    "custom": _custom,
}
