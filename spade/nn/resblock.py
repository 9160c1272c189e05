"""The SPADE residual block (Park et al., 2019, figure 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spade.nn.spade_norm import SPADE
from spade.nn.spectral import conv2d


class SPADEResBlock(nn.Module):
    """Two SPADE -> leaky ReLU -> 3x3 conv steps plus a shortcut.

    The middle width is min(fin, fout). When fin != fout the shortcut is learned:
    SPADE then a 1x1 convolution without bias.
    """

    def __init__(
        self,
        fin: int,
        fout: int,
        semantic_nc: int,
        *,
        norm: str = "syncbatch",
        kernel_size: int = 3,
        hidden: int = 128,
        spectral: bool = True,
    ) -> None:
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = conv2d(fin, fmiddle, 3, padding=1, spectral=spectral)
        self.conv_1 = conv2d(fmiddle, fout, 3, padding=1, spectral=spectral)
        if self.learned_shortcut:
            self.conv_s = conv2d(fin, fout, 1, bias=False, spectral=spectral)
        spade = dict(norm=norm, kernel_size=kernel_size, hidden=hidden)
        self.norm_0 = SPADE(fin, semantic_nc, **spade)
        self.norm_1 = SPADE(fmiddle, semantic_nc, **spade)
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, semantic_nc, **spade)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return shortcut + dx
