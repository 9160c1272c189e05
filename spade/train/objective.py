"""The SPADE training objective: one generator step and one discriminator step.

Generator: hinge GAN + feature matching + VGG perceptual loss (+ KL divergence when
the image encoder is on). Discriminator: hinge on real and fake, with fake and real
sent through it in one batch, as in the authors' release.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spade.config import ModelConfig, TrainConfig
from spade.labels import semantic_input
from spade.losses import GANLoss, VGGLoss, feature_matching_loss, kl_divergence
from spade.nn import ConvEncoder, SPADEGenerator, reparameterize


class GeneratorSide(nn.Module):
    """Generator and (optional) encoder, trained together by one optimiser."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.generator = SPADEGenerator.from_config(cfg)
        self.encoder = ConvEncoder.from_config(cfg) if cfg.use_vae else None

    def forward(
        self, seg: torch.Tensor, real: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(fake, mu, logvar); mu/logvar are None without the encoder."""
        if self.encoder is None:
            return self.generator(seg), None, None
        mu, logvar = self.encoder(real)
        return self.generator(seg, reparameterize(mu, logvar)), mu, logvar


def init_weights(module: nn.Module, gain: float = 0.02) -> None:
    """Xavier-normal (gain 0.02) convolution and linear weights, zero biases, as the release does."""
    for m in module.modules():
        weight = getattr(m, "weight_orig", None)
        if weight is None and isinstance(m, nn.Conv2d | nn.Linear):
            weight = m.weight
        if weight is not None:
            nn.init.xavier_normal_(weight, gain=gain)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)


@dataclass
class Objective:
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    vgg: VGGLoss | None
    world_size: int = 1

    def __post_init__(self) -> None:
        self.gan = GANLoss(self.train_cfg.gan_mode)

    def inputs(self, batch: dict, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        label = batch["label"].to(device, non_blocking=True)
        instance = batch["instance"].to(device, non_blocking=True) if self.model_cfg.use_instance else None
        seg = semantic_input(label, self.model_cfg, instance)
        real = batch["image"].to(device, non_blocking=True)
        if channels_last:
            seg = seg.contiguous(memory_format=torch.channels_last)
            real = real.contiguous(memory_format=torch.channels_last)
        return seg, real

    @staticmethod
    def discriminate(d: nn.Module, seg: torch.Tensor, fake: torch.Tensor, real: torch.Tensor):
        """D on [seg, fake] and [seg, real] in one batch; returns (fake outputs, real outputs)."""
        both = torch.cat([torch.cat([seg, fake], dim=1), torch.cat([seg, real], dim=1)], dim=0)
        out = d(both)
        n = fake.shape[0]
        return [[f[:n] for f in scale] for scale in out], [[f[n:] for f in scale] for scale in out]

    def generator_losses(self, g: nn.Module, d: nn.Module, seg: torch.Tensor, real: torch.Tensor) -> dict:
        tc = self.train_cfg
        fake, mu, logvar = g(seg, real)
        pred_fake, pred_real = self.discriminate(d, seg, fake, real)
        losses = {"G_GAN": self.gan.generator(pred_fake)}
        if tc.feat_loss:
            losses["G_feat"] = feature_matching_loss(pred_fake, pred_real, tc.lambda_feat)
        if self.vgg is not None:
            losses["G_VGG"] = self.vgg(fake.float(), real.float())
        if mu is not None:
            # the KL term is a sum over the batch; gradients are averaged over ranks, so scale it back
            losses["G_KLD"] = kl_divergence(mu.float(), logvar.float(), tc.lambda_kld) * self.world_size
        return losses

    def discriminator_losses(self, g: nn.Module, d: nn.Module, seg: torch.Tensor, real: torch.Tensor) -> dict:
        with torch.no_grad():
            fake, _, _ = g(seg, real)
        fake = fake.detach()
        pred_fake, pred_real = self.discriminate(d, seg, fake, real)
        d_real, d_fake = self.gan.discriminator(pred_real, pred_fake)
        return {"D_real": d_real, "D_fake": d_fake}
