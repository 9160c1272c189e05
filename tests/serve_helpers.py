"""Tiny checkpoints and label maps for the serving tests."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from spade.checkpoints import Checkpoint
from spade.config import ModelConfig
from spade.nn.encoder import ConvEncoder
from spade.nn.generator import SPADEGenerator


def make_checkpoint(*, vae: bool = False, instance: bool = False, meta: dict | None = None, **changes) -> Checkpoint:
    torch.manual_seed(0)
    opts = dict(label_nc=8, crop_size=32, ngf=4, contain_dontcare_label=True, use_instance=instance, use_vae=vae)
    cfg = ModelConfig.from_preset("custom", **{**opts, **changes})
    enc = ConvEncoder.from_config(cfg).state_dict() if vae else None
    return Checkpoint(cfg, SPADEGenerator.from_config(cfg).state_dict(), enc, meta=meta or {})


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def label_map(h: int = 24, w: int = 40, seed: int = 0, n: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, n, (h // 8 + 1, w // 8 + 1)).astype(np.uint8)
    return np.repeat(np.repeat(coarse, 8, 0), 8, 1)[:h, :w]


def decode(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))
