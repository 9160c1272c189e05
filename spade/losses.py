"""Training objectives: adversarial losses, feature matching, VGG perceptual loss, KL divergence."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spade.errors import SpadeError
from spade.nn.vgg import VGG19Features

GAN_MODES = ("hinge", "ls", "original", "w")
VGG_LAYER_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)

# A discriminator output: per scale, a list of features whose last item is the logits.
DOutput = Sequence[Sequence[torch.Tensor]]


class GANLoss:
    """Adversarial loss of the given mode, averaged over discriminator scales.

    hinge (default): D: mean(relu(1 - real)) + mean(relu(1 + fake)); G: -mean(fake).
    ls: squared error to 1 (real) / 0 (fake). original: binary cross-entropy on logits.
    w: Wasserstein, -mean(real) + mean(fake); G: -mean(fake).
    """

    def __init__(self, mode: str = "hinge") -> None:
        if mode not in GAN_MODES:
            raise SpadeError(f"unknown GAN loss {mode!r}; use one of {', '.join(GAN_MODES)}")
        self.mode = mode

    def _term(self, logits: torch.Tensor, real: bool, for_discriminator: bool) -> torch.Tensor:
        if self.mode == "hinge":
            if not for_discriminator:
                return -logits.mean()
            return F.relu(1 - logits).mean() if real else F.relu(1 + logits).mean()
        if self.mode == "ls":
            return F.mse_loss(logits, torch.full_like(logits, 1.0 if real else 0.0))
        if self.mode == "original":
            return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 if real else 0.0))
        return -logits.mean() if real else logits.mean()

    def __call__(self, outputs: DOutput | torch.Tensor, *, real: bool, for_discriminator: bool = True) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs = [[outputs]]
        terms = [self._term(scale[-1], real, for_discriminator) for scale in outputs]
        return torch.stack(terms).mean()

    def discriminator(self, real_out: DOutput, fake_out: DOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss on real, loss on fake) for the discriminator step."""
        return self(real_out, real=True), self(fake_out, real=False)

    def generator(self, fake_out: DOutput) -> torch.Tensor:
        return self(fake_out, real=True, for_discriminator=False)


def feature_matching_loss(fake_out: DOutput, real_out: DOutput, weight: float = 10.0) -> torch.Tensor:
    """L1 between discriminator features of fake and real (logits excluded), averaged over scales."""
    total = fake_out[0][0].new_zeros(())
    for fake_scale, real_scale in zip(fake_out, real_out, strict=True):
        for f, r in zip(fake_scale[:-1], real_scale[:-1], strict=True):
            total = total + F.l1_loss(f, r.detach())
    return total * weight / len(fake_out)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, weight: float = 0.05) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over the batch and dimensions, times the weight."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) * weight


class VGGLoss(nn.Module):
    """Weighted L1 between VGG19 relu1_1..relu5_1 features of fake and real images.

    Images go in as the generator produces them, in [-1, 1], as in the authors' release.
    """

    def __init__(self, features: VGG19Features, weight: float = 10.0) -> None:
        super().__init__()
        self.features = features
        self.weight = weight

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        fake_f, real_f = self.features(fake), self.features(real)
        loss = fake.new_zeros(())
        for w, f, r in zip(VGG_LAYER_WEIGHTS, fake_f, real_f, strict=True):
            loss = loss + w * F.l1_loss(f, r.detach())
        return loss * self.weight
