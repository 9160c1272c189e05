"""A compact segmenter (about 0.4 M parameters) trained in a few CPU minutes on a small data set.

It scores the built-in landscapes (and any small custom-layout set with a classes.txt) the
way DeepLab-v2 scores COCO-Stuff: segment the synthesized photos, compare with the input
label maps. The network is a four-level encoder-decoder (3x3 conv + BN + ReLU, strided
downsampling, a dilated and a global-context layer at the bottom, skip connections on the
way up). Photos are segmented at a fixed working size (short side = the training size,
aspect kept) and the logits are upsampled to the photo's size.

The weight file is one dict, readable with torch.load(weights_only=True)::

    {"format": "spade-small-segmenter", "version": 1,
     "config": {"num_classes", "class_names", "widths", "input_size", "mean", "std"},
     "state_dict": {...}, "metrics": {"val_pixel_accuracy": ...}}
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spade.config import DataConfig
from spade.data.layouts import Sample, find_pairs
from spade.data.synthetic import read_class_names
from spade.errors import SpadeError
from spade.evaluate.segmenters.base import Segmentation, Segmenter
from spade.evaluate.segmenters.inference import (
    autocast,
    batches_by_size,
    check_photos,
    load_strict,
    resolve_device,
    to_segmentation,
)
from spade.images import open_image
from spade.labels import read_id_map
from spade.progress import progress_bar

NAME = "small"
FORMAT = "spade-small-segmenter"
VERSION = 1
DEFAULT_FILE = "small_segmenter.pt"
DEFAULT_WIDTHS = (16, 32, 64, 96)
IGNORE = 255


# --------------------------------------------------------------------------- network


def _conv(cin: int, cout: int, *, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallSegNet(nn.Module):
    """Encoder-decoder: widths[i] channels at 1/2**i of the input; any input size works."""

    def __init__(self, num_classes: int, widths: Sequence[int] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        if num_classes < 1 or len(widths) < 2 or min(widths) < 1:
            raise SpadeError(f"small segmenter: bad shape num_classes={num_classes}, widths={list(widths)}")
        w = list(widths)
        self.stem = nn.Sequential(_conv(3, w[0]), _conv(w[0], w[0]))
        self.down = nn.ModuleList(nn.Sequential(_conv(a, b, stride=2), _conv(b, b)) for a, b in itertools.pairwise(w))
        self.context = _conv(w[-1], w[-1], dilation=2)
        self.global_context = nn.Conv2d(w[-1], w[-1], 1)
        self.up = nn.ModuleList(_conv(b + a, a) for a, b in itertools.pairwise(w))
        self.head = nn.Conv2d(w[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        h = self.context(skips.pop())
        h = h + self.global_context(h.mean(dim=(2, 3), keepdim=True))
        for up, skip in zip(reversed(self.up), reversed(skips), strict=True):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = up(torch.cat([h, skip], dim=1))
        return self.head(h)


@dataclass
class SmallSegmenterConfig:
    num_classes: int
    class_names: list[str] | None = None
    widths: list[int] = field(default_factory=lambda: list(DEFAULT_WIDTHS))
    input_size: int = 64  # the short side photos are resized to
    mean: float = 0.5  # photos in [0, 1] are normalised as (x - mean) / std
    std: float = 0.25


# --------------------------------------------------------------------------- inference


def working_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_input(image: torch.Tensor, config: SmallSegmenterConfig) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1] -> the network's normalised input."""
    return (image - config.mean) / config.std


def preprocess(photo: np.ndarray, config: SmallSegmenterConfig) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> (1, 3, h, w): short side at the working size (bilinear, antialiased), normalised."""
    x = torch.from_numpy(np.array(photo, copy=True)).permute(2, 0, 1)[None].float().div(255.0)
    size = working_size(photo.shape[0], photo.shape[1], config.input_size)
    if size != tuple(photo.shape[:2]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return to_input(x, config)


class SmallSegmenter:
    name = NAME

    def __init__(
        self,
        model: SmallSegNet,
        config: SmallSegmenterConfig,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        bf16: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.config = config
        self.num_classes = config.num_classes
        self.class_names = config.class_names
        self.batch_size = batch_size
        self.bf16 = bf16

    def segment(self, photos: list[np.ndarray]) -> list[Segmentation]:
        check_photos(photos)
        inputs = [preprocess(p, self.config) for p in photos]
        results: list[Segmentation | None] = [None] * len(photos)
        with torch.inference_mode():
            for group in batches_by_size([tuple(x.shape[-2:]) for x in inputs], self.batch_size):
                with autocast(self.device, self.bf16):
                    logits = self.model(torch.cat([inputs[i] for i in group]).to(self.device))
                for i, lg in zip(group, logits, strict=True):
                    results[i] = to_segmentation(lg, photos[i].shape[:2])
        return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- files


def save_small_segmenter(
    model: SmallSegNet, config: SmallSegmenterConfig, path: str | Path, *, metrics: dict[str, float] | None = None
) -> Path:
    """Write the weight file atomically (a temp file in the same folder, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": asdict(config),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "metrics": dict(metrics or {}),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def build_from_state(
    state: dict,
    *,
    source: str,
    device: str = "cpu",
    num_classes: int | None = None,
    batch_size: int = 32,
    bf16: bool = False,
    input_size: int | None = None,
) -> SmallSegmenter:
    """A segmenter from a loaded weight file; `input_size` overrides the working size it was trained at."""
    if state.get("format") != FORMAT:
        raise SpadeError(
            f"{source}: not a small segmenter file (expected a dict with 'format': {FORMAT!r}; "
            f"found keys {', '.join(list(state)[:5])}); train one with train_small_segmenter"
        )
    version = state.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise SpadeError(f"{source}: small segmenter file version {version!r}; this code reads version {VERSION}")
    try:
        config = SmallSegmenterConfig(**state["config"])
    except (KeyError, TypeError) as exc:
        raise SpadeError(f"{source}: small segmenter file has a bad 'config' ({exc})") from None
    if num_classes is not None and num_classes != config.num_classes:
        raise SpadeError(
            f"{source}: holds a small segmenter of {config.num_classes} classes, "
            f"but num_classes={num_classes} was asked"
        )
    if input_size is not None:
        config.input_size = input_size
    model = SmallSegNet(config.num_classes, config.widths)
    load_strict(model, state.get("state_dict", {}), source=source, what="small segmenter")
    return SmallSegmenter(model, config, device=device, batch_size=batch_size, bf16=bf16)


# --------------------------------------------------------------------------- training


def _read_photo(path: Path) -> np.ndarray:
    with open_image(path, what="image") as img:
        return np.asarray(img.convert("RGB"))


def _class_ids(sample: Sample, num_classes: int) -> np.ndarray:
    ids = read_id_map(sample.label, "label map")
    return np.where((ids >= 0) & (ids < num_classes), ids, IGNORE)


def _load_split(samples: list[Sample], size: int, num_classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(image float [0, 1] (3, h, w), ids int64 (h, w)) per sample, the short side resized to `size`."""
    out = []
    for sample in samples:
        photo, ids = _read_photo(sample.image), _class_ids(sample, num_classes)
        if photo.shape[:2] != ids.shape:
            raise SpadeError(f"{sample.image}: photo and label map {sample.label.name} differ in size")
        image = torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].float().div(255.0)
        label = torch.from_numpy(ids)[None, None].float()
        target = working_size(photo.shape[0], photo.shape[1], size)
        if target != photo.shape[:2]:
            image = F.interpolate(image, size=target, mode="bilinear", align_corners=False, antialias=True)
            label = F.interpolate(label, size=target, mode="nearest")
        out.append((image[0], label[0, 0].long()))
    return out


def _uniform(g: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _augmented_batch(
    data: list[tuple[torch.Tensor, torch.Tensor]], size: int, batch_size: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random zoomed crops and flips, then colour, contrast, saturation, noise and blur jitter."""
    images, labels = [], []
    for index in torch.randint(len(data), (batch_size,), generator=g).tolist():
        image, label = data[index]
        h, w = label.shape
        crop = max(2, round(min(h, w) / float(_uniform(g, 1, 1.0, 1.4))))
        top = int(torch.randint(h - crop + 1, (1,), generator=g))
        left = int(torch.randint(w - crop + 1, (1,), generator=g))
        image = image[None, :, top : top + crop, left : left + crop]
        label = label[None, None, top : top + crop, left : left + crop].float()
        if crop != size:
            image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
            label = F.interpolate(label, size=(size, size), mode="nearest")
        if bool(torch.rand(1, generator=g) < 0.5):
            image, label = image.flip(-1), label.flip(-1)
        images.append(image)
        labels.append(label)
    x = torch.cat(images)
    y = torch.cat(labels)[:, 0].long()
    n = x.shape[0]
    gray = x.mean(dim=1, keepdim=True)
    x = gray + (x - gray) * _uniform(g, n, 0.6, 1.4).view(n, 1, 1, 1)  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * _uniform(g, n, 0.7, 1.3).view(n, 1, 1, 1)  # contrast
    x = x * _uniform(g, n, 0.7, 1.3).view(n, 1, 1, 1) * _uniform(g, 3 * n, 0.9, 1.1).view(n, 3, 1, 1)  # light
    blur = (torch.rand(n, generator=g) < 0.25).view(n, 1, 1, 1)
    x = torch.where(blur, F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False), x)
    x = x + torch.randn(x.shape, generator=g) * _uniform(g, n, 0.0, 0.04).view(n, 1, 1, 1)
    return x.clamp(0.0, 1.0), y


def pixel_accuracy(segmenter: Segmenter, samples: list[Sample], num_classes: int) -> float:
    """Fraction of labelled pixels (ids < num_classes) whose predicted class is right."""
    right = total = 0
    for start in range(0, len(samples), 64):
        chunk = samples[start : start + 64]
        results = segmenter.segment([_read_photo(s.image) for s in chunk])
        for sample, result in zip(chunk, results, strict=True):
            ids = _class_ids(sample, num_classes)
            valid = ids != IGNORE
            right += int((result.labels[valid] == ids[valid]).sum())
            total += int(valid.sum())
    return right / max(total, 1)


def train_small_segmenter(
    data_root: str | Path,
    out: str | Path,
    *,
    size: int = 64,
    iterations: int = 1500,
    batch_size: int = 16,
    lr: float = 3e-3,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Fit the small segmenter on `data_root`'s train split (custom layout with classes.txt) and save it to `out`.

    `out` is a file path, or an existing folder to write small_segmenter.pt into. When the data set has a
    val split, its pixel accuracy is measured at the end, printed (with `progress`) and kept in
    the file's "metrics". Deterministic for a given seed on CPU. Returns the written file.
    """
    if size < 8 or iterations < 1 or batch_size < 1:
        raise SpadeError(
            f"small segmenter: need size >= 8, iterations >= 1, batch_size >= 1 (got {size}, "
            f"{iterations}, {batch_size})"
        )
    root = Path(data_root)
    out = Path(out)
    if out.is_dir():
        out = out / DEFAULT_FILE
    class_names = read_class_names(root)
    num_classes = len(class_names)
    train = _load_split(find_pairs(DataConfig(layout="custom", root=str(root), split="train")), size, num_classes)
    try:
        val_samples = find_pairs(DataConfig(layout="custom", root=str(root), split="val"))
    except SpadeError:
        val_samples = []

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    config = SmallSegmenterConfig(
        num_classes=num_classes, class_names=class_names, widths=list(widths), input_size=size
    )
    model = SmallSegNet(num_classes, widths)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, min(50, iterations // 10))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, iterations - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    bar = progress_bar(range(iterations), desc="small segmenter", unit="it", disable=not progress)
    for _ in bar:
        x, y = _augmented_batch(train, size, batch_size, g)
        loss = F.cross_entropy(model(to_input(x, config)), y, ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()

    metrics: dict[str, float] = {}
    if val_samples:
        accuracy = pixel_accuracy(SmallSegmenter(model, config), val_samples, num_classes)
        metrics["val_pixel_accuracy"] = accuracy
        if progress:
            print(f"small segmenter: val pixel accuracy {accuracy:.4f} on {len(val_samples)} scenes", file=sys.stderr)
    return save_small_segmenter(model, config, out, metrics=metrics)
