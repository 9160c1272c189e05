"""SPADE: spatially-adaptive (de)normalisation (Park et al., 2019, section 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spade.errors import SpadeError


def param_free_norm(kind: str, channels: int) -> nn.Module:
    """A normalisation without learned affine parameters.

    `syncbatch` builds a plain BatchNorm2d; the trainer converts it to
    SyncBatchNorm when it runs distributed (the state-dict keys are the same).
    """
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False)
    if kind in ("batch", "syncbatch"):
        return nn.BatchNorm2d(channels, affine=False)
    raise SpadeError(f"unknown parameter-free norm {kind!r}; use instance, batch or syncbatch")


class SPADE(nn.Module):
    """Normalise x, then modulate it with a scale and bias predicted from the label map.

    out = norm(x) * (1 + gamma(seg)) + beta(seg), where the label map is resized
    (nearest) to x's size and passed through a shared conv + ReLU and two convs.
    """

    def __init__(
        self, norm_nc: int, label_nc: int, *, norm: str = "syncbatch", kernel_size: int = 3, hidden: int = 128
    ) -> None:
        super().__init__()
        if kernel_size not in (1, 3, 5):
            raise SpadeError(f"SPADE kernel size must be 1, 3 or 5, got {kernel_size}")
        pad = kernel_size // 2
        self.param_free_norm = param_free_norm(norm, norm_nc)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, kernel_size, padding=pad), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, kernel_size, padding=pad)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, kernel_size, padding=pad)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        normalized = self.param_free_norm(x)
        if segmap.shape[-2:] != x.shape[-2:]:
            segmap = F.interpolate(segmap, size=x.shape[-2:], mode="nearest")
        actv = self.mlp_shared(segmap)
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)
