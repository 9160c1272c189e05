"""An independent, functional re-computation of the published networks from raw state-dict tensors.

It follows the architecture description in the reference facts (spectral norm as
weight_orig / (u . W v) with the stored vectors, batch norm from running
statistics) using only torch.nn.functional, so the tests can check that the
project's modules compute the same thing from the same tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BN_EPS = 1e-5


def sn_weight(sd: dict, prefix: str) -> torch.Tensor:
    w = sd[f"{prefix}.weight_orig"]
    sigma = torch.dot(sd[f"{prefix}.weight_u"], w.reshape(w.shape[0], -1) @ sd[f"{prefix}.weight_v"])
    return w / sigma


def conv(sd: dict, prefix: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    spectral = f"{prefix}.weight_orig" in sd
    w = sn_weight(sd, prefix) if spectral else sd[f"{prefix}.weight"]
    return F.conv2d(x, w, sd.get(f"{prefix}.bias"), stride=stride, padding=w.shape[-1] // 2)


def bn_eval(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    mean = sd[f"{prefix}.running_mean"].view(1, -1, 1, 1)
    var = sd[f"{prefix}.running_var"].view(1, -1, 1, 1)
    return (x - mean) / torch.sqrt(var + BN_EPS)


def spade(sd: dict, prefix: str, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    seg = F.interpolate(seg, size=x.shape[-2:], mode="nearest")
    actv = F.relu(conv(sd, f"{prefix}.mlp_shared.0", seg))
    gamma = conv(sd, f"{prefix}.mlp_gamma", actv)
    beta = conv(sd, f"{prefix}.mlp_beta", actv)
    return bn_eval(sd, f"{prefix}.param_free_norm", x) * (1 + gamma) + beta


def resblock(sd: dict, prefix: str, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    if f"{prefix}.conv_s.weight_orig" in sd:
        shortcut = conv(sd, f"{prefix}.conv_s", spade(sd, f"{prefix}.norm_s", x, seg))
    else:
        shortcut = x
    dx = conv(sd, f"{prefix}.conv_0", F.leaky_relu(spade(sd, f"{prefix}.norm_0", x, seg), 0.2))
    dx = conv(sd, f"{prefix}.conv_1", F.leaky_relu(spade(sd, f"{prefix}.norm_1", dx, seg), 0.2))
    return shortcut + dx


def generator(sd: dict, seg: torch.Tensor, *, latent: tuple[int, int], more: bool, z: torch.Tensor | None = None):
    sh, sw = latent
    if z is not None:
        x = F.linear(z, sd["fc.weight"], sd["fc.bias"]).view(z.shape[0], -1, sh, sw)
    else:
        x = conv(sd, "fc", F.interpolate(seg, size=(sh, sw), mode="nearest"))

    def up(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, scale_factor=2, mode="nearest")

    x = resblock(sd, "head_0", x, seg)
    x = resblock(sd, "G_middle_0", up(x), seg)
    if more:
        x = up(x)
    x = resblock(sd, "G_middle_1", x, seg)
    for i in range(4):
        x = resblock(sd, f"up_{i}", up(x), seg)
    x = conv(sd, "conv_img", F.leaky_relu(x, 0.2))
    return torch.tanh(x)


def encoder(sd: dict, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = F.interpolate(image, size=(256, 256), mode="bilinear") if image.shape[-2:] != (256, 256) else image
    i = 1
    while f"layer{i}.0.weight_orig" in sd:
        if i > 1:
            x = F.leaky_relu(x, 0.2)
        x = F.instance_norm(conv(sd, f"layer{i}.0", x, stride=2))
        i += 1
    x = F.leaky_relu(x, 0.2).flatten(1)
    return F.linear(x, sd["fc_mu.weight"], sd["fc_mu.bias"]), F.linear(x, sd["fc_var.weight"], sd["fc_var.bias"])


def discriminator(sd: dict, x: torch.Tensor, num_D: int = 2) -> list[list[torch.Tensor]]:
    results = []
    for d in range(num_D):
        if d:
            x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
        p = f"discriminator_{d}"
        feats = [
            F.leaky_relu(F.conv2d(x, sd[f"{p}.model0.0.weight"], sd[f"{p}.model0.0.bias"], stride=2, padding=2), 0.2)
        ]
        n = 1
        while f"{p}.model{n}.0.0.weight_orig" in sd:
            w = sn_weight(sd, f"{p}.model{n}.0.0")
            stride = 1 if f"{p}.model{n + 1}.0.0.weight_orig" not in sd else 2
            feats.append(F.leaky_relu(F.instance_norm(F.conv2d(feats[-1], w, stride=stride, padding=2)), 0.2))
            n += 1
        feats.append(F.conv2d(feats[-1], sd[f"{p}.model{n}.0.weight"], sd[f"{p}.model{n}.0.bias"], padding=2))
        results.append(feats)
    return results
