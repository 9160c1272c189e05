"""DeepLab-v2 ResNet-101 with ASPP and multi-scale inputs: the COCO-Stuff segmenter of the paper's evaluation.

It loads the public checkpoint `deeplabv2_resnet101_msc-cocostuff164k-100000.pth` strictly (632
tensors, 55.9 M parameters, 182 COCO-Stuff classes). The network:

- stem (`base.layer1`): 7x7 stride-2 conv + BN + ReLU, 3x3 stride-2 max-pool (padding 1, ceil mode);
- four stages of caffe-style bottlenecks (`base.layer2..5`, 3 / 4 / 23 / 3 blocks): the stride sits
  on the first 1x1 conv, convs have no bias, BN eps 1e-5; the last two stages use stride 1 with
  dilation 2 and 4, so the features are at 1/8 of the input;
- ASPP (`base.aspp`): four 3x3 convs with dilations 6, 12, 18, 24 on the 2048 channels, summed.

Inference, as the checkpoint was used: the RGB photo becomes BGR float 0..255 minus the channel
means, its long side is resized to 513 (bilinear), the network runs at scales 1, 0.5 and 0.75,
and the three logit maps, resized to the scale-1 map's size, are combined by pixel-wise max.
The result is upsampled (bilinear) to the photo's size before softmax and argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spade.errors import SpadeError
from spade.evaluate.segmenters.base import Segmentation
from spade.evaluate.segmenters.inference import (
    autocast,
    batches_by_size,
    check_photos,
    load_strict,
    read_label_names,
    resolve_device,
    to_segmentation,
    unwrap_state,
)

NAME = "deeplabv2-cocostuff"
DEFAULT_FILE = "deeplabv2_resnet101_msc-cocostuff164k-100000.pth"
COCOSTUFF_LABELS = Path(__file__).with_name("cocostuff_labels.txt")
NUM_COCOSTUFF_CLASSES = 182

BGR_MEAN = (104.008, 116.669, 122.675)
LONG_SIDE = 513
SCALES = (1.0, 0.5, 0.75)
ASPP_RATES = (6, 12, 18, 24)
BLOCKS = (3, 4, 23, 3)
BN_EPS = 1e-5


# --------------------------------------------------------------------------- network


class ConvBn(nn.Module):
    """Conv (no bias) + batch norm, optionally followed by ReLU."""

    def __init__(
        self, cin: int, cout: int, kernel: int, *, stride: int = 1, dilation: int = 1, relu: bool = True
    ) -> None:
        super().__init__()
        padding = dilation * (kernel // 2)
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class Bottleneck(nn.Module):
    """1x1 reduce (carries the stride) -> 3x3 (dilated) -> 1x1 increase, plus the identity or a projection."""

    def __init__(self, cin: int, cout: int, *, stride: int, dilation: int, projection: bool) -> None:
        super().__init__()
        mid = cout // 4
        self.reduce = ConvBn(cin, mid, 1, stride=stride)
        self.conv3x3 = ConvBn(mid, mid, 3, dilation=dilation)
        self.increase = ConvBn(mid, cout, 1, relu=False)
        self.shortcut = ConvBn(cin, cout, 1, stride=stride, relu=False) if projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.increase(self.conv3x3(self.reduce(x)))
        return F.relu(h + (self.shortcut(x) if self.shortcut is not None else x))


class ResStage(nn.Sequential):
    """`blocks` bottlenecks named block1, block2, ...; the first one projects the shortcut."""

    def __init__(self, blocks: int, cin: int, cout: int, *, stride: int, dilation: int) -> None:
        super().__init__()
        for i in range(blocks):
            first = i == 0
            self.add_module(
                f"block{i + 1}",
                Bottleneck(
                    cin if first else cout, cout, stride=stride if first else 1, dilation=dilation, projection=first
                ),
            )


class Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvBn(3, 64, 7, stride=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv1(x))


class ASPP(nn.Module):
    """Parallel 3x3 convs at several dilations whose outputs are summed (c0, c1, ...)."""

    def __init__(self, cin: int, num_classes: int, rates: Sequence[int] = ASPP_RATES) -> None:
        super().__init__()
        for i, rate in enumerate(rates):
            conv = nn.Conv2d(cin, num_classes, 3, padding=rate, dilation=rate, bias=True)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
            self.add_module(f"c{i}", conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.children())


class DeepLabV2Backbone(nn.Sequential):
    """Single-scale DeepLab-v2: ResNet-101 at output stride 8 and ASPP; logits at 1/8 of the input."""

    def __init__(self, num_classes: int = NUM_COCOSTUFF_CLASSES, blocks: Sequence[int] = BLOCKS) -> None:
        super().__init__()
        self.add_module("layer1", Stem())
        self.add_module("layer2", ResStage(blocks[0], 64, 256, stride=1, dilation=1))
        self.add_module("layer3", ResStage(blocks[1], 256, 512, stride=2, dilation=1))
        self.add_module("layer4", ResStage(blocks[2], 512, 1024, stride=1, dilation=2))
        self.add_module("layer5", ResStage(blocks[3], 1024, 2048, stride=1, dilation=4))
        self.add_module("aspp", ASPP(2048, num_classes))


def scale_pyramid(x: torch.Tensor, scales: Sequence[float] = SCALES) -> list[torch.Tensor]:
    """The input at each scale (bilinear; scale 1 is the input itself)."""
    return [
        x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False, antialias=False)
        for s in scales
    ]


def combine_scales(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pixel-wise max over per-scale logits, each first resized (bilinear) to the first one's size.

    The first entry is the scale-1 logits; all entries, that one included, take part in the max
    (the DeepLab-v2 "MSC" merge: max over the scale 1, 0.5 and 0.75 outputs).
    """
    size = logits[0].shape[-2:]
    resized = [
        lg if lg.shape[-2:] == size else F.interpolate(lg, size=size, mode="bilinear", align_corners=False)
        for lg in logits
    ]
    return torch.stack(resized).amax(dim=0)


class DeepLabV2(nn.Module):
    """Multi-scale DeepLab-v2 (the checkpoint's keys sit under `base.`); always in eval mode (frozen BN)."""

    def __init__(self, num_classes: int = NUM_COCOSTUFF_CLASSES, scales: Sequence[float] = SCALES) -> None:
        super().__init__()
        if not scales:
            raise SpadeError("DeepLab-v2 needs at least one input scale")
        self.base = DeepLabV2Backbone(num_classes)
        self.scales = tuple(float(s) for s in scales)
        self.num_classes = num_classes
        self.eval()

    def train(self, mode: bool = True) -> DeepLabV2:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) preprocessed input -> (N, C, h, w) logits at the first scale's output size."""
        return combine_scales([self.base(xs) for xs in scale_pyramid(x, self.scales)])


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- preprocessing


def resized_size(height: int, width: int, long_side: int | None = LONG_SIDE) -> tuple[int, int]:
    """(h, w) with the long side at `long_side` and the aspect kept (rounded); None keeps the size."""
    if long_side is None:
        return height, width
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def preprocess(photo: np.ndarray, long_side: int | None = LONG_SIDE) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> (1, 3, h, w) float: BGR order, 0..255 minus the BGR means, long side resized."""
    x = torch.from_numpy(np.ascontiguousarray(photo[:, :, ::-1])).permute(2, 0, 1).float()
    x = x - torch.tensor(BGR_MEAN).view(3, 1, 1)
    size = resized_size(photo.shape[0], photo.shape[1], long_side)
    x = x[None]
    if size != tuple(photo.shape[:2]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    return x


# --------------------------------------------------------------------------- segmenter


def cocostuff_class_names() -> list[str]:
    """The 182 COCO-Stuff class names; index = the label id in the data sets (0 = person ... 181 = wood)."""
    return read_label_names(COCOSTUFF_LABELS)


class DeepLabV2Segmenter:
    """Photos in, COCO-Stuff labels out (see the module docstring for the exact pipeline)."""

    name = NAME

    def __init__(
        self,
        model: DeepLabV2,
        *,
        class_names: list[str] | None = None,
        device: str | torch.device = "cpu",
        long_side: int | None = LONG_SIDE,
        batch_size: int = 4,
        bf16: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.num_classes = model.num_classes
        self.class_names = class_names
        self.long_side = long_side
        self.batch_size = batch_size
        self.bf16 = bf16

    def logits(self, photos: list[np.ndarray]) -> list[torch.Tensor]:
        """Combined multi-scale logits (C, h, w) of each photo, at 1/8 of its resized size."""
        check_photos(photos)
        inputs = [preprocess(p, self.long_side) for p in photos]
        out: list[torch.Tensor | None] = [None] * len(photos)
        with torch.inference_mode(), autocast(self.device, self.bf16):
            for group in batches_by_size([tuple(x.shape[-2:]) for x in inputs], self.batch_size):
                batch = torch.cat([inputs[i] for i in group]).to(self.device)
                for i, lg in zip(group, self.model(batch).float(), strict=True):
                    out[i] = lg
        return out  # type: ignore[return-value]

    def segment(self, photos: list[np.ndarray]) -> list[Segmentation]:
        logits = self.logits(photos)
        with torch.inference_mode():
            return [to_segmentation(lg, p.shape[:2]) for lg, p in zip(logits, photos, strict=True)]


def build_from_state(
    state: dict[str, torch.Tensor],
    *,
    source: str,
    device: str = "cpu",
    num_classes: int | None = None,
    long_side: int | None = LONG_SIDE,
    scales: Sequence[float] = SCALES,
    batch_size: int = 4,
    bf16: bool = False,
) -> DeepLabV2Segmenter:
    """A segmenter from a loaded state dict (the class count is read from the ASPP weights)."""
    state = unwrap_state(state)
    aspp = state.get("base.aspp.c0.weight")
    found = int(aspp.shape[0]) if isinstance(aspp, torch.Tensor) and aspp.ndim == 4 else NUM_COCOSTUFF_CLASSES
    if num_classes is not None and num_classes != found:
        raise SpadeError(f"{source}: holds a DeepLab-v2 of {found} classes, but num_classes={num_classes} was asked")
    model = DeepLabV2(found, scales)
    load_strict(model, state, source=source, what="DeepLab-v2 ResNet-101 (deeplabv2_resnet101_msc)")
    names = cocostuff_class_names() if found == NUM_COCOSTUFF_CLASSES else None
    return DeepLabV2Segmenter(
        model, class_names=names, device=device, long_side=long_side, batch_size=batch_size, bf16=bf16
    )
