"""torchvision's DeepLab-v3 (ResNet-50 or ResNet-101 backbone) with weights from a file, any class count.

The backbone depth, the class count and whether the file carries the auxiliary head are
read from the file's keys. Photos are normalised with the ImageNet mean and std (RGB in
[0, 1]) and segmented at their own size, or with the short side resized to `short_side`;
the logits are upsampled bilinearly to the photo's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation import deeplabv3_resnet50, deeplabv3_resnet101

from spade.errors import SpadeError
from spade.evaluate.segmenters.base import Segmentation
from spade.evaluate.segmenters.inference import (
    autocast,
    batches_by_size,
    check_photos,
    class_names_option,
    load_strict,
    resolve_device,
    to_segmentation,
    unwrap_state,
)

NAME = "torchvision-deeplabv3"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHES = {"resnet50": deeplabv3_resnet50, "resnet101": deeplabv3_resnet101}
_LAYER3_BLOCKS = {6: "resnet50", 23: "resnet101"}
_HEAD_KEY = "classifier.4.weight"


def build_deeplabv3(arch: str, num_classes: int, *, aux_loss: bool = False) -> nn.Module:
    """An untrained torchvision DeepLab-v3 (nothing downloaded)."""
    if arch not in ARCHES:
        raise SpadeError(f"unknown DeepLab-v3 backbone {arch!r}; choose one of {', '.join(ARCHES)}")
    return ARCHES[arch](weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss)


def infer_arch(state: dict[str, torch.Tensor]) -> str | None:
    """resnet50 or resnet101 from the number of blocks in the backbone's third stage, None if unknown."""
    blocks = {k.split(".")[2] for k in state if k.startswith("backbone.layer3.")}
    return _LAYER3_BLOCKS.get(len(blocks))


def resized_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """(h, w) with the short side at `short_side` and the aspect kept (rounded); None keeps the size."""
    if short_side is None:
        return height, width
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def preprocess(photo: np.ndarray, short_side: int | None = None) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> (1, 3, h, w): [0, 1], ImageNet-normalised, optionally resized (bilinear)."""
    x = torch.from_numpy(np.array(photo, copy=True)).permute(2, 0, 1).float().div(255.0)
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    size = resized_size(photo.shape[0], photo.shape[1], short_side)
    x = x[None]
    if size != tuple(photo.shape[:2]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x


class TorchvisionDeepLabV3Segmenter:
    name = NAME

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        class_names: list[str] | None = None,
        device: str | torch.device = "cpu",
        short_side: int | None = None,
        batch_size: int = 4,
        bf16: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.num_classes = num_classes
        self.class_names = class_names
        self.short_side = short_side
        self.batch_size = batch_size
        self.bf16 = bf16

    def segment(self, photos: list[np.ndarray]) -> list[Segmentation]:
        check_photos(photos)
        inputs = [preprocess(p, self.short_side) for p in photos]
        results: list[Segmentation | None] = [None] * len(photos)
        with torch.inference_mode():
            for group in batches_by_size([tuple(x.shape[-2:]) for x in inputs], self.batch_size):
                batch = torch.cat([inputs[i] for i in group]).to(self.device)
                with autocast(self.device, self.bf16):
                    # the auxiliary head, when the file has one, is not needed for inference
                    logits = self.model.classifier(self.model.backbone(batch)["out"])
                for i, lg in zip(group, logits, strict=True):
                    results[i] = to_segmentation(lg, photos[i].shape[:2])
        return results  # type: ignore[return-value]


def build_from_state(
    state: dict[str, torch.Tensor],
    *,
    source: str,
    device: str = "cpu",
    num_classes: int | None = None,
    arch: str | None = None,
    short_side: int | None = None,
    class_names: Sequence[str] | str | Path | None = None,
    batch_size: int = 4,
    bf16: bool = False,
) -> TorchvisionDeepLabV3Segmenter:
    """A segmenter from a loaded torchvision DeepLab-v3 state dict; `class_names` is a list or an id<TAB>name file."""
    state = unwrap_state(state)
    head = state.get(_HEAD_KEY)
    found_arch = infer_arch(state)
    if not isinstance(head, torch.Tensor) or found_arch is None:
        sample = ", ".join(list(state)[:3])
        raise SpadeError(
            f"{source}: not torchvision DeepLab-v3 weights (no {_HEAD_KEY} or backbone.layer3 of a ResNet-50/101; "
            f"keys start {sample})"
        )
    arch = arch or found_arch
    found = int(head.shape[0])
    if num_classes is not None and num_classes != found:
        raise SpadeError(f"{source}: holds a DeepLab-v3 of {found} classes, but num_classes={num_classes} was asked")
    aux = any(k.startswith("aux_classifier.") for k in state)
    model = build_deeplabv3(arch, found, aux_loss=aux)
    load_strict(model, state, source=source, what=f"torchvision deeplabv3_{arch}")
    return TorchvisionDeepLabV3Segmenter(
        model,
        found,
        class_names=class_names_option(class_names, found, source=source),
        device=device,
        short_side=short_side,
        batch_size=batch_size,
        bf16=bf16,
    )
