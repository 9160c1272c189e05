"""Project checkpoints, and conversion of the authors' published state-dict files.

A project checkpoint is a plain dict saved with torch.save and read back with
`torch.load(weights_only=True)`:

    {"format": "spade-checkpoint", "version": 1,
     "config": ModelConfig as a dict, "generator": state dict,
     "encoder": state dict or None, "discriminator": state dict or None,
     "meta": {...}, "training": {...} or absent}
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from spade.config import ModelConfig
from spade.errors import SpadeError
from spade.nn.discriminator import MultiscaleDiscriminator
from spade.nn.encoder import ConvEncoder
from spade.nn.generator import SPADEGenerator
from spade.presets import OFFICIAL_PRESETS
from spade.weights import load_state_dict

FORMAT = "spade-checkpoint"
VERSION = 1
NETWORKS = {"generator": SPADEGenerator, "encoder": ConvEncoder, "discriminator": MultiscaleDiscriminator}

StateDict = dict[str, torch.Tensor]


@dataclass
class Checkpoint:
    config: ModelConfig
    generator: StateDict
    encoder: StateDict | None = None
    discriminator: StateDict | None = None
    meta: dict = field(default_factory=dict)
    training: dict | None = None

    def to_dict(self) -> dict:
        out = {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config.to_dict(),
            "generator": self.generator,
            "encoder": self.encoder,
            "discriminator": self.discriminator,
            "meta": self.meta,
        }
        if self.training is not None:
            out["training"] = self.training
        return out

    def save(self, path: str | Path) -> Path:
        """Write atomically: a reader never sees a half-written file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(self.to_dict(), fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not path.is_file():
            raise SpadeError(f"checkpoint not found: {path}")
        data = load_state_dict(path, what="checkpoint")
        if data.get("format") != FORMAT:
            if any(isinstance(v, torch.Tensor) for v in data.values()):
                raise SpadeError(
                    f"{path} is a bare state dict (such as the authors' latest_net_G.pth), not a project "
                    f"checkpoint; convert it first: spade convert-official --preset coco --generator {path} "
                    f"--output model.pt"
                )
            raise SpadeError(f"{path} is not a SPADE project checkpoint")
        if data.get("version", 0) > VERSION:
            raise SpadeError(f"{path} was written by a newer version (format {data['version']} > {VERSION})")
        return cls(
            config=ModelConfig.from_dict(data["config"]),
            generator=data["generator"],
            encoder=data.get("encoder"),
            discriminator=data.get("discriminator"),
            meta=data.get("meta") or {},
            training=data.get("training"),
        )

    def build(self, network: str) -> nn.Module | None:
        """The named network with its weights loaded, in eval mode (None if not stored)."""
        state = getattr(self, network)
        if state is None:
            return None
        # built on the meta device, then given memory: every value comes from the state (strict), so
        # the random initialisation a plain build does (0.2 s for coco) would be thrown away
        with torch.device("meta"):
            net = NETWORKS[network].from_config(self.config)
        _allocate(net).load_state_dict(state, strict=True)
        return net.eval()

    def build_generator(self) -> SPADEGenerator:
        return self.build("generator")

    def build_encoder(self) -> ConvEncoder | None:
        return self.build("encoder")


def _allocate(net: nn.Module) -> nn.Module:
    """`net`, built on the meta device, given uninitialised CPU memory for each parameter and buffer, to be
    filled by a strict load_state_dict. (Module.to_empty does the same, but its first call imports sympy:
    0.3 s more at start-up.) A non-persistent buffer would stay uninitialised, so there must be none."""
    for module in net.modules():
        if module._non_persistent_buffers_set:
            raise TypeError(f"{type(module).__name__} has buffers no state dict fills")
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    return net


def expected_shapes(network: str, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the named network's state dict, built without allocating memory."""
    with torch.device("meta"):
        net = NETWORKS[network].from_config(cfg)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def compare_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Human-readable list of missing, unexpected and mis-shaped keys (empty when it matches)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = items[:15] + ([f"... and {len(items) - 15} more"] if len(items) > 15 else [])
            problems.append(f"{len(items)} {title} key(s): " + "; ".join(shown))
    return problems


def _strip_module_prefix(state: StateDict) -> StateDict:
    if state and all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _identify(network: str, state: StateDict) -> tuple[str, bool] | None:
    """Which official (preset, use_vae) this state dict fits exactly, if any."""
    for preset in OFFICIAL_PRESETS:
        for use_vae in (False, True):
            cfg = ModelConfig.from_preset(preset, use_vae=use_vae)
            if not compare_state(state, expected_shapes(network, cfg)):
                return preset, use_vae
    return None


def _check_official(network: str, path: Path, state: StateDict, cfg: ModelConfig) -> None:
    problems = compare_state(state, expected_shapes(network, cfg))
    if not problems:
        return
    fits = _identify(network, state)
    if fits is not None:
        preset, use_vae = fits
        if preset != cfg.preset:
            raise SpadeError(f"{path} is a {preset} {network}, not {cfg.preset}: run again with --preset {preset}")
        if use_vae and not cfg.use_vae:
            raise SpadeError(
                f"{path} is a {preset} generator trained with the image encoder: pass its latest_net_E.pth "
                f"with --encoder"
            )
        if cfg.use_vae and not use_vae:
            raise SpadeError(f"{path} is a {preset} generator without an image encoder: drop --encoder")
    raise SpadeError(f"{path} does not match the {cfg.preset} {network}: " + " | ".join(problems))


def convert_official(
    preset: str,
    generator: str | Path,
    *,
    encoder: str | Path | None = None,
    discriminator: str | Path | None = None,
) -> Checkpoint:
    """Read the authors' latest_net_G.pth (+ latest_net_E.pth, latest_net_D.pth) into a checkpoint.

    Every key and shape is checked against the preset's networks; a file from
    another preset, or a generator that needs an encoder, is named as such.
    """
    if preset not in OFFICIAL_PRESETS:
        raise SpadeError(f"official checkpoints exist for {', '.join(OFFICIAL_PRESETS)}; got preset {preset!r}")
    cfg = ModelConfig.from_preset(preset, use_vae=encoder is not None)
    files = {"generator": generator, "encoder": encoder, "discriminator": discriminator}
    states: dict[str, StateDict | None] = {}
    for network, file in files.items():
        if file is None:
            states[network] = None
            continue
        path = Path(file)
        if not path.is_file():
            raise SpadeError(f"{network} file not found: {path}")
        state = _strip_module_prefix(load_state_dict(path, what=f"{network} state dict"))
        _check_official(network, path, state, cfg)
        states[network] = {k: v.detach().contiguous() for k, v in state.items()}
    return Checkpoint(
        config=cfg,
        generator=states["generator"],
        encoder=states["encoder"],
        discriminator=states["discriminator"],
        meta={
            "source": "official",
            "converted_from": {k: str(Path(v).resolve()) for k, v in files.items() if v is not None},
        },
    )
