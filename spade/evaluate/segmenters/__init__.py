"""Segmenters by name: photos in, per-pixel class ids out (see base.py for the interface).

    seg = load_segmenter("deeplabv2-cocostuff", "weights/deeplabv2_resnet101_msc-cocostuff164k-100000.pth")
    results = seg.segment([photo])  # photo: RGB uint8 (H, W, 3); results[0].labels is (H, W)

Names:
- "deeplabv2-cocostuff": DeepLab-v2 ResNet-101, multi-scale, 182 COCO-Stuff classes (the paper's metric);
- "torchvision-deeplabv3": torchvision DeepLab-v3 ResNet-50/101, any class count, weights from a file;
- "small": a compact network trained on a small data set with train_small_segmenter.

Weights are a local file, a folder holding the default file name, or an s3:// URI (downloaded to
a temporary file first); None looks for the default file in the torch hub cache. Files are read
with torch.load(weights_only=True).
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spade.errors import SpadeError
from spade.evaluate.segmenters import deeplabv2, small, torchvision_deeplabv3
from spade.evaluate.segmenters.base import Segmentation, Segmenter
from spade.evaluate.segmenters.small import train_small_segmenter
from spade.storage import Store, is_s3
from spade.weights import find_weights, load_state_dict


@dataclass(frozen=True)
class SegmenterEntry:
    """A registered segmenter: how to build it from a loaded weight file, and what file it expects."""

    name: str
    description: str
    default_file: str
    build: Callable[..., Segmenter]  # build(state, *, source, device, num_classes, **options)

    def options(self) -> list[str]:
        skip = {"state", "source", "device", "num_classes"}
        return [p for p in inspect.signature(self.build).parameters if p not in skip]


SEGMENTERS: dict[str, SegmenterEntry] = {
    deeplabv2.NAME: SegmenterEntry(
        deeplabv2.NAME,
        "DeepLab-v2 ResNet-101 (multi-scale, ASPP), 182 COCO-Stuff classes",
        deeplabv2.DEFAULT_FILE,
        deeplabv2.build_from_state,
    ),
    torchvision_deeplabv3.NAME: SegmenterEntry(
        torchvision_deeplabv3.NAME,
        "torchvision DeepLab-v3 ResNet-50/101, any class count",
        "deeplabv3.pth",
        torchvision_deeplabv3.build_from_state,
    ),
    small.NAME: SegmenterEntry(
        small.NAME,
        "compact encoder-decoder trained with train_small_segmenter",
        small.DEFAULT_FILE,
        small.build_from_state,
    ),
}


def looks_like(state: dict) -> str | None:
    """The registered segmenter whose weights `state` resembles, or None."""
    if state.get("format") == small.FORMAT:
        return small.NAME
    keys = set(state.get("state_dict", state)) if isinstance(state.get("state_dict"), dict) else set(state)
    keys = {k.removeprefix("module.") for k in keys if isinstance(k, str)}
    if "base.aspp.c0.weight" in keys:
        return deeplabv2.NAME
    if "classifier.4.weight" in keys and any(k.startswith("backbone.layer3.") for k in keys):
        return torchvision_deeplabv3.NAME
    return None


def _load(entry: SegmenterEntry, weights: str | Path | None) -> tuple[dict, str]:
    what = f"{entry.name} segmenter"
    if weights is not None and is_s3(weights):
        uri = str(weights)
        parent, _, file_name = uri.rstrip("/").rpartition("/")
        with tempfile.TemporaryDirectory(prefix="spade-segmenter-") as tmp:
            local = Store(parent).get(file_name, Path(tmp) / file_name)
            state = load_state_dict(local, what=what)
        return state, uri
    path = find_weights(weights, entry.default_file, what=what)
    return load_state_dict(path, what=what), str(path)


def load_segmenter(
    name: str,
    weights: str | Path | None,
    *,
    device: str = "cpu",
    num_classes: int | None = None,
    **options: object,
) -> Segmenter:
    """The segmenter `name` with its weights from `weights` (local path, folder or s3:// URI).

    `num_classes`, when given, must match the file. Options per name (all keyword):
    deeplabv2-cocostuff: long_side=513, scales=(1.0, 0.5, 0.75), batch_size=4, bf16=False;
    torchvision-deeplabv3: arch=None (from the file), short_side=None, class_names=None, batch_size=4, bf16=False;
    small: input_size=None (the training size), batch_size=32, bf16=False.
    `bf16` runs the network under bfloat16 autocast (faster on recent CPUs, slightly less exact).
    """
    entry = SEGMENTERS.get(name)
    if entry is None:
        raise SpadeError(f"unknown segmenter {name!r}; choose one of {', '.join(SEGMENTERS)}")
    unknown = sorted(set(options) - set(entry.options()))
    if unknown:
        raise SpadeError(
            f"segmenter {name!r} has no option(s) {', '.join(unknown)}; its options are {', '.join(entry.options())}"
        )
    state, source = _load(entry, weights)
    try:
        return entry.build(state, source=source, device=device, num_classes=num_classes, **options)
    except SpadeError as exc:
        other = looks_like(state)
        if other is not None and other != name:
            raise SpadeError(f"{exc}\nThe file looks like {other!r} weights: load_segmenter({other!r}, ...)") from None
        raise


__all__ = [
    "SEGMENTERS",
    "SegmenterEntry",
    "Segmentation",
    "Segmenter",
    "load_segmenter",
    "looks_like",
    "train_small_segmenter",
]
