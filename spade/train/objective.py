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
from spade.errors import SpadeError
from spade.labels import semantic_input
from spade.losses import GANLoss, VGGLoss, feature_matching_loss, kl_divergence
from spade.nn import ConvEncoder, MultiscaleDiscriminator, SPADEGenerator, reparameterize
from spade.precision import autocast_for, resolve_precision


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


def training_numerics(tc: TrainConfig, device: torch.device) -> tuple[str, bool]:
    """(precision, channels_last) a run uses on `device`: "auto" resolved, and channels-last only with
    bf16 / fp16; float32 stays NCHW, the exact path (oneDNN's channels-last float32 convolutions round more)."""
    precision = resolve_precision(tc.precision, device, choices=("float32", "bfloat16", "float16"))
    if precision == "float16" and device.type != "cuda":
        raise SpadeError("train.precision=float16 needs CUDA; on CPU use bfloat16 or float32")
    return precision, tc.channels_last and precision != "float32"


def build_networks(mc: ModelConfig, tc: TrainConfig) -> tuple[GeneratorSide, MultiscaleDiscriminator]:
    """The generator side and the discriminator, initialised as the release does."""
    gside = GeneratorSide(mc)
    disc = MultiscaleDiscriminator.from_config(mc)
    init_weights(gside, tc.init_gain)
    init_weights(disc, tc.init_gain)
    return gside, disc


def place(device: torch.device, channels_last: bool, *modules: nn.Module) -> None:
    """Move modules to `device`, channels-last when asked."""
    for m in modules:
        m.to(device)
        if channels_last:
            m.to(memory_format=torch.channels_last)


def build_optimizers(gside: nn.Module, disc: nn.Module, tc: TrainConfig) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for each side, with the TTUR learning rates and betas of `tc`."""
    opt_g = torch.optim.Adam(gside.parameters(), lr=tc.lr_G, betas=tc.betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=tc.lr_D, betas=tc.betas)
    return opt_g, opt_d


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


class TrainStep:
    """One training iteration: a generator step (every `d_steps_per_g` iterations), then a discriminator step.

    The trainer and `benchmarks/train_step.py` both run this, so the benchmark
    measures exactly what training does. fp16 uses gradient scalers; bf16 and
    float32 do not need them (the scalers are then pass-throughs).
    """

    def __init__(
        self,
        objective: Objective,
        g_model: nn.Module,
        d_model: nn.Module,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer,
        *,
        precision: str,
        device: torch.device,
    ) -> None:
        self.objective, self.g_model, self.d_model = objective, g_model, d_model
        self.opt_g, self.opt_d = opt_g, opt_d
        self.precision, self.device = precision, device
        use_scaler = precision == "float16"
        self.scaler_g = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.scaler_d = torch.amp.GradScaler(device.type, enabled=use_scaler)

    def __call__(self, seg: torch.Tensor, real: torch.Tensor, iteration: int) -> dict[str, torch.Tensor]:
        """Run the steps for `iteration`; returns the loss terms (detached tensors)."""
        objective = self.objective
        logged: dict[str, torch.Tensor] = {}
        if iteration % objective.train_cfg.d_steps_per_g == 0:
            logged.update(self._step(objective.generator_losses, self.opt_g, self.scaler_g, seg, real))
        logged.update(self._step(objective.discriminator_losses, self.opt_d, self.scaler_d, seg, real))
        return {k: v.detach() for k, v in logged.items()}

    def _step(self, losses, opt, scaler, seg, real) -> dict[str, torch.Tensor]:  # noqa: ANN001
        """One optimiser step on the sum of `losses(G, D, seg, real)`; returns the terms."""
        opt.zero_grad(set_to_none=True)
        with autocast_for(self.precision, self.device):
            terms = losses(self.g_model, self.d_model, seg, real)
        scaler.scale(sum(terms.values())).backward()
        scaler.step(opt)
        scaler.update()
        return terms


@dataclass
class StepForTiming:
    """One process's training iteration as `spade train` sets it up, for the benchmark and the demo's estimate."""

    objective: Objective
    step: TrainStep
    gside: GeneratorSide
    precision: str
    channels_last: bool

    def __call__(self, batch: dict, iteration: int) -> dict[str, torch.Tensor]:
        seg, real = self.objective.inputs(batch, self.step.device, self.channels_last)
        return self.step(seg, real, iteration)


def step_for_timing(mc: ModelConfig, tc: TrainConfig, device: torch.device) -> StepForTiming:
    """Networks initialised as the release does, Adam with the TTUR rates and the configured losses, placed and
    with the numerics `spade train` picks on `device`; the VGG19 of the VGG loss has random weights (the
    same cost as the real ones, which need not be on the machine)."""
    from spade.nn.vgg import VGG19Features

    precision, channels_last = training_numerics(tc, device)
    gside, disc = build_networks(mc, tc)
    place(device, channels_last, gside, disc)
    vgg = VGGLoss(VGG19Features(load=False).to(device), tc.lambda_vgg) if tc.vgg_loss else None
    opt_g, opt_d = build_optimizers(gside, disc, tc)
    objective = Objective(mc, tc, vgg)
    step = TrainStep(objective, gside, disc, opt_g, opt_d, precision=precision, device=device)
    return StepForTiming(objective, step, gside, precision, channels_last)
