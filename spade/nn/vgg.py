"""VGG19 feature extractor for the perceptual loss, weights from a local file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import vgg19

from spade.errors import SpadeError
from spade.weights import find_weights, load_state_dict

VGG19_FILE = "vgg19-dcbb9e9d.pth"
# relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 end at these indices of vgg19().features
SLICE_ENDS = (2, 7, 12, 21, 30)


class VGG19Features(nn.Module):
    """Frozen torchvision VGG19 returning relu1_1 .. relu5_1 activations."""

    def __init__(self, weights: str | Path | None = None, *, load: bool = True) -> None:
        super().__init__()
        features = vgg19(weights=None).features
        if load:
            path = find_weights(
                weights, VGG19_FILE, what="VGG19", hint=" (or train without the VGG loss: --no-vgg-loss)"
            )
            state = load_state_dict(path, what="VGG19 weights")
            prefixed = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
            try:
                features.load_state_dict(prefixed, strict=True)
            except RuntimeError as exc:
                raise SpadeError(f"{path}: not torchvision's VGG19 weights ({exc})") from None
        starts = (0, *SLICE_ENDS[:-1])
        self.slices = nn.ModuleList(
            nn.Sequential(*[features[i] for i in range(a, b)]) for a, b in zip(starts, SLICE_ENDS, strict=True)
        )
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGG19Features:
        return super().train(False)  # always frozen, never in training mode

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for s in self.slices:
            x = s(x)
            out.append(x)
        return out
