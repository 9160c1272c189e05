"""The SPADE generator (Park et al., 2019, figure 4 and appendix A)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spade.config import ModelConfig
from spade.errors import SpadeError
from spade.nn.resblock import SPADEResBlock


class SPADEGenerator(nn.Module):
    """Label map (one-hot, [+ don't-care, + instance edges]) -> RGB image in [-1, 1].

    Without the encoder the downsampled label map is convolved into the first
    feature map; with it (`use_vae`), a linear layer maps the style vector z.
    Channel widths go 16, 16, 16, 8, 4, 2, 1 (x ngf), each upsampling nearest x2;
    `more` adds an upsampling between the middle blocks, `most` also an extra
    block at ngf/2 channels.
    """

    def __init__(
        self,
        *,
        semantic_nc: int,
        ngf: int = 64,
        crop_size: int = 256,
        aspect_ratio: float = 1.0,
        num_upsampling_layers: str = "normal",
        use_vae: bool = False,
        z_dim: int = 256,
        norm: str = "syncbatch",
        kernel_size: int = 3,
        hidden: int = 128,
        spectral: bool = True,
    ) -> None:
        super().__init__()
        self.num_upsampling_layers = num_upsampling_layers
        self.use_vae = use_vae
        self.z_dim = z_dim
        num_up = {"normal": 5, "more": 6, "most": 7}[num_upsampling_layers]
        self.sw = crop_size // 2**num_up
        self.sh = round(self.sw / aspect_ratio)
        nf = ngf
        if use_vae:
            self.fc = nn.Linear(z_dim, 16 * nf * self.sw * self.sh)
        else:
            self.fc = nn.Conv2d(semantic_nc, 16 * nf, 3, padding=1)

        def block(fin: int, fout: int) -> SPADEResBlock:
            return SPADEResBlock(
                fin, fout, semantic_nc, norm=norm, kernel_size=kernel_size, hidden=hidden, spectral=spectral
            )

        self.head_0 = block(16 * nf, 16 * nf)
        self.G_middle_0 = block(16 * nf, 16 * nf)
        self.G_middle_1 = block(16 * nf, 16 * nf)
        self.up_0 = block(16 * nf, 8 * nf)
        self.up_1 = block(8 * nf, 4 * nf)
        self.up_2 = block(4 * nf, 2 * nf)
        self.up_3 = block(2 * nf, 1 * nf)
        final_nc = nf
        if num_upsampling_layers == "most":
            self.up_4 = block(1 * nf, nf // 2)
            final_nc = nf // 2
        self.conv_img = nn.Conv2d(final_nc, 3, 3, padding=1)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> SPADEGenerator:
        return cls(
            semantic_nc=cfg.semantic_nc,
            ngf=cfg.ngf,
            crop_size=cfg.crop_size,
            aspect_ratio=cfg.aspect_ratio,
            num_upsampling_layers=cfg.num_upsampling_layers,
            use_vae=cfg.use_vae,
            z_dim=cfg.z_dim,
            norm=cfg.spade_norm,
            kernel_size=cfg.spade_kernel,
            hidden=cfg.spade_hidden,
            spectral=cfg.spectral_G,
        )

    @property
    def output_size(self) -> tuple[int, int]:
        num_up = {"normal": 5, "more": 6, "most": 7}[self.num_upsampling_layers]
        return self.sh * 2**num_up, self.sw * 2**num_up

    def forward(
        self, seg: torch.Tensor, z: torch.Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if self.use_vae:
            if z is None:
                z = torch.randn(seg.shape[0], self.z_dim, generator=generator, device=seg.device, dtype=seg.dtype)
            if z.shape != (seg.shape[0], self.z_dim):
                raise SpadeError(f"style vector z must have shape ({seg.shape[0]}, {self.z_dim}), got {tuple(z.shape)}")
            x = self.fc(z).view(-1, self.fc.out_features // (self.sh * self.sw), self.sh, self.sw)
        else:
            x = self.fc(F.interpolate(seg, size=(self.sh, self.sw), mode="nearest"))

        x = self.head_0(x, seg)
        x = _up(x)
        x = self.G_middle_0(x, seg)
        if self.num_upsampling_layers in ("more", "most"):
            x = _up(x)
        x = self.G_middle_1(x, seg)
        for name in ("up_0", "up_1", "up_2", "up_3"):
            x = getattr(self, name)(_up(x), seg)
        if self.num_upsampling_layers == "most":
            x = self.up_4(_up(x), seg)
        x = self.conv_img(F.leaky_relu(x, 0.2))
        return torch.tanh(x)


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")
