"""Multi-scale PatchGAN discriminator (pix2pixHD style, as used by SPADE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spade.config import ModelConfig
from spade.nn.spectral import conv2d


def _norm_conv(fin: int, fout: int, stride: int, norm: str, spectral: bool) -> nn.Module:
    """Conv 4x4 (spectral-normalised when asked) followed by a parameter-free norm.

    A bias is only kept when no norm follows, since the norm would remove it.
    """
    conv = conv2d(fin, fout, 4, stride=stride, padding=2, bias=norm == "none", spectral=spectral)
    if norm == "instance":
        return nn.Sequential(conv, nn.InstanceNorm2d(fout, affine=False))
    if norm == "batch":
        return nn.Sequential(conv, nn.BatchNorm2d(fout, affine=True))
    return nn.Sequential(conv)


class NLayerDiscriminator(nn.Module):
    """One scale: returns the output of every stage (the last is the patch logits)."""

    def __init__(
        self, *, input_nc: int, ndf: int = 64, n_layers: int = 4, norm: str = "instance", spectral: bool = True
    ):
        super().__init__()
        stages: list[list[nn.Module]] = [[nn.Conv2d(input_nc, ndf, 4, stride=2, padding=2), nn.LeakyReLU(0.2)]]
        nf = ndf
        for n in range(1, n_layers):
            nf_prev, nf = nf, min(nf * 2, 512)
            stride = 1 if n == n_layers - 1 else 2
            stages.append([_norm_conv(nf_prev, nf, stride, norm, spectral), nn.LeakyReLU(0.2)])
        stages.append([nn.Conv2d(nf, 1, 4, stride=1, padding=2)])
        for i, stage in enumerate(stages):
            self.add_module(f"model{i}", nn.Sequential(*stage))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.children():
            x = stage(x)
            features.append(x)
        return features


class MultiscaleDiscriminator(nn.Module):
    """`num_D` PatchGANs; each next one sees the input average-pooled by 2."""

    def __init__(
        self,
        *,
        input_nc: int,
        ndf: int = 64,
        num_D: int = 2,
        n_layers: int = 4,
        norm: str = "instance",
        spectral: bool = True,
    ) -> None:
        super().__init__()
        for i in range(num_D):
            self.add_module(
                f"discriminator_{i}",
                NLayerDiscriminator(input_nc=input_nc, ndf=ndf, n_layers=n_layers, norm=norm, spectral=spectral),
            )

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> MultiscaleDiscriminator:
        return cls(
            input_nc=cfg.semantic_nc + 3,
            ndf=cfg.ndf,
            num_D=cfg.num_D,
            n_layers=cfg.n_layers_D,
            norm=cfg.norm_D,
            spectral=cfg.spectral_D,
        )

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per scale, the list of intermediate features ending with the logits."""
        results = []
        for i, d in enumerate(self.children()):
            if i:
                x = F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)
            results.append(d(x))
        return results
