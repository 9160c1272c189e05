"""The image encoder for multi-modal and style-guided synthesis (Park et al., 2019, appendix A)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spade.config import ModelConfig
from spade.nn.spectral import conv2d

ENCODER_INPUT = 256


class ConvEncoder(nn.Module):
    """Image -> (mu, logvar) of the style distribution.

    The image is resized (bilinear) to 256x256, then 3x3 stride-2 convolutions
    (ngf x 1, 2, 4, 8, 8 and, for crops >= 256, a sixth at 8) with instance norm
    and leaky ReLU, then two linear layers to mu and logvar.
    """

    def __init__(
        self, *, ngf: int = 64, crop_size: int = 256, z_dim: int = 256, norm: str = "instance", spectral: bool = True
    ) -> None:
        super().__init__()
        widths = [3, ngf, 2 * ngf, 4 * ngf, 8 * ngf, 8 * ngf] + ([8 * ngf] if crop_size >= 256 else [])
        for i, (fin, fout) in enumerate(zip(widths[:-1], widths[1:], strict=True), start=1):
            conv = conv2d(fin, fout, 3, stride=2, padding=1, bias=norm == "none", spectral=spectral)
            layer = [conv]
            if norm == "instance":
                layer.append(nn.InstanceNorm2d(fout, affine=False))
            elif norm == "batch":
                layer.append(nn.BatchNorm2d(fout, affine=True))
            self.add_module(f"layer{i}", nn.Sequential(*layer))
        self.num_layers = len(widths) - 1
        side = ENCODER_INPUT // 2**self.num_layers
        self.fc_mu = nn.Linear(widths[-1] * side * side, z_dim)
        self.fc_var = nn.Linear(widths[-1] * side * side, z_dim)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ConvEncoder:
        return cls(ngf=cfg.ngf, crop_size=cfg.crop_size, z_dim=cfg.z_dim, norm=cfg.norm_E, spectral=cfg.spectral_E)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image
        if x.shape[-2:] != (ENCODER_INPUT, ENCODER_INPUT):
            x = F.interpolate(x, size=(ENCODER_INPUT, ENCODER_INPUT), mode="bilinear")
        for i in range(1, self.num_layers + 1):
            if i > 1:
                x = F.leaky_relu(x, 0.2)
            x = getattr(self, f"layer{i}")(x)
        x = F.leaky_relu(x, 0.2).flatten(1)
        return self.fc_mu(x), self.fc_var(x)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + exp(0.5 logvar) * eps, eps ~ N(0, I)."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps
