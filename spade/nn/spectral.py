"""Spectral normalisation for convolutions, with the authors' state-dict layout.

A spectral-normalised convolution stores `weight_orig` (the learned weight) and
the power-iteration vectors `weight_u`, `weight_v`, exactly the keys the public
checkpoints use. The effective weight is `weight_orig / sigma` with
`sigma = u . (W v)`, `W` being `weight_orig` flattened to (out, -1). In training
one power iteration refreshes u and v before each forward; in eval the stored
vectors are used as they are, so a loaded checkpoint computes what it computed
when it was saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpectralNormConv2d(nn.Conv2d):
    def __init__(self, *args, n_power_iterations: int = 1, eps: float = 1e-12, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        weight = self.weight
        del self.weight
        self.weight_orig = nn.Parameter(weight.detach())
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        height, width = weight.shape[0], weight[0].numel()
        self.register_buffer("weight_u", self._random_unit(weight, height))
        self.register_buffer("weight_v", self._random_unit(weight, width))

    def _random_unit(self, weight: torch.Tensor, n: int) -> torch.Tensor:
        """The power iteration's starting vector; on the meta device (a network its state fills) only a shape:
        drawing there costs nothing but first imports torch._dynamo, most of a second."""
        vector = weight.new_empty(n)
        return vector if vector.is_meta else F.normalize(vector.normal_(), dim=0, eps=self.eps)

    def normalized_weight(self) -> torch.Tensor:
        # sigma in float32 even under autocast: the power iteration writes into float32 buffers
        with torch.autocast(self.weight_orig.device.type, enabled=False):
            return self._normalized_weight()

    def _normalized_weight(self) -> torch.Tensor:
        w_mat = self.weight_orig.flatten(1)
        u, v = self.weight_u, self.weight_v
        if self.training:
            with torch.no_grad():
                for _ in range(self.n_power_iterations):
                    v = F.normalize(torch.mv(w_mat.t(), u), dim=0, eps=self.eps, out=v)
                    u = F.normalize(torch.mv(w_mat, v), dim=0, eps=self.eps, out=u)
            # u and v were updated in place; clone so autograd keeps the values used here
            u, v = u.clone(memory_format=torch.contiguous_format), v.clone(memory_format=torch.contiguous_format)
        sigma = torch.dot(u, torch.mv(w_mat, v))
        return self.weight_orig / sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normalized_weight(), self.bias)


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int = 0,
    bias: bool = True,
    spectral: bool = False,
) -> nn.Conv2d:
    """A convolution, spectral-normalised when asked."""
    cls = SpectralNormConv2d if spectral else nn.Conv2d
    return cls(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
