"""Synthesis: label map (+ instance map, + style image) -> image, with the reference's test-time preprocessing.

`Synthesizer` loads a checkpoint once and turns prepared inputs into images; the
command line, the serving handler and evaluation all go through it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spade.checkpoints import Checkpoint
from spade.config import ModelConfig
from spade.data.suffixes import IMAGE_SUFFIXES
from spade.errors import SpadeError
from spade.images import open_image
from spade.labels import class_ids_and_edges, one_hot_input, read_id_map, to_class_ids
from spade.nn.inference import InferenceGenerator
from spade.precision import DTYPES, autocast_for, resolve_precision


@dataclass
class LabelInput:
    """One prepared input: class ids (and instance ids) at the model's resolution."""

    name: str
    label: torch.Tensor  # (1, H, W) int64 class ids
    instance: torch.Tensor | None  # (1, H, W) int64 ids, or None
    original_size: tuple[int, int]  # (height, width) of the label file


def resize_ids(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize with PIL, as the reference does for label and instance maps."""
    h, w = size
    if ids.shape == (h, w):
        return ids
    img = Image.fromarray(ids.astype(np.int32), mode="I")
    return np.asarray(img.resize((w, h), Image.NEAREST), dtype=np.int64)


def read_rgb(path: str | Path, size: tuple[int, int], *, what: str = "image") -> torch.Tensor:
    """An image file as a (3, H, W) tensor in [-1, 1], resized bicubic to (height, width)."""
    with open_image(path, what=what) as img:
        rgb = img.convert("RGB")
    h, w = size
    if rgb.size != (w, h):
        rgb = rgb.resize((w, h), Image.BICUBIC)
    arr = np.asarray(rgb, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def prepare_label(cfg: ModelConfig, label_path: str | Path, instance_path: str | Path | None = None) -> LabelInput:
    """Read, check and resize a label map (and its instance map) the way the reference's test mode does.

    Without an instance map, an instance-aware model gets the label map's own class
    boundaries as instance edges.
    """
    raw = read_id_map(label_path, "label map")
    ids = to_class_ids(raw, cfg, source=str(label_path))
    inst = None
    if instance_path is not None:
        inst = read_id_map(instance_path, "instance map")
        if inst.shape != raw.shape:
            raise SpadeError(
                f"{instance_path}: instance map is {inst.shape[1]}x{inst.shape[0]} but label map {label_path} is "
                f"{raw.shape[1]}x{raw.shape[0]}; they must have the same size"
            )
    elif cfg.use_instance:
        inst = ids
    size = cfg.output_size
    label = torch.from_numpy(resize_ids(ids, size)).unsqueeze(0)
    instance = torch.from_numpy(resize_ids(inst, size)).unsqueeze(0) if cfg.use_instance else None
    return LabelInput(Path(label_path).stem, label, instance, raw.shape)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, as (x + 1) / 2 * 255, clipped, truncated."""
    x = ((images.float() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_png(array: np.ndarray, path: str | Path, *, resize_to: tuple[int, int] | None = None) -> Path:
    """Write an (H, W, 3) uint8 image atomically; optionally resized (bicubic) to (height, width)."""
    path = Path(path)
    img = Image.fromarray(array)
    if resize_to is not None and (resize_to[1], resize_to[0]) != img.size:
        img = img.resize((resize_to[1], resize_to[0]), Image.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            img.save(fh, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class Synthesizer:
    """A checkpoint's generator (and encoder) loaded once, ready to synthesize batches.

    `fast` (the default) runs the folded inference generator (spade.nn.inference):
    in float32 it agrees with the eager generator up to rounding, in bfloat16 its
    weights are stored in bf16. `fast=False` runs the eager generator (under
    autocast for bfloat16), the reference path.
    """

    def __init__(
        self, checkpoint: Checkpoint, *, device: str = "cpu", precision: str = "float32", fast: bool = True
    ) -> None:
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.fast = fast
        # the network that runs: the folded InferenceGenerator (fast) or the eager SPADEGenerator
        self.generator: torch.nn.Module = checkpoint.build_generator().to(self.device)
        if fast:
            cfg = self.config
            self.generator = InferenceGenerator.from_generator(
                self.generator,
                n_onehot=cfg.onehot_nc,
                use_edge=cfg.use_instance,
                dtype=DTYPES[self.precision],
            )
        encoder = checkpoint.build_encoder()
        self.encoder = encoder.to(self.device) if encoder is not None else None

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: object) -> Synthesizer:
        return cls(Checkpoint.load(path), **kwargs)

    @property
    def multimodal(self) -> bool:
        return self.config.use_vae

    @torch.inference_mode()
    def encode_style(self, style: torch.Tensor) -> torch.Tensor:
        """Style images (N, 3, H, W) in [-1, 1] -> their mean style vectors mu (N, z_dim)."""
        if self.encoder is None:
            raise SpadeError(
                f"this {self.config.preset} checkpoint has no image encoder, so it cannot take a style image"
            )
        with autocast_for(self.precision, self.device):
            mu, _ = self.encoder(style.to(self.device))
        return mu.float()

    def style_noise(self, batch: int, seed: int) -> torch.Tensor:
        """Style vectors z ~ N(0, I) drawn from `seed` (the same seed gives the same style)."""
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(1, self.config.z_dim, generator=gen)
        return z.expand(batch, -1).contiguous()

    @torch.inference_mode()
    def synthesize(
        self,
        label: torch.Tensor,
        instance: torch.Tensor | None = None,
        *,
        style: torch.Tensor | None = None,
        seed: int = 0,
        z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class ids (N, 1, H, W) [+ instance ids] -> images (N, 3, H, W) in [-1, 1], float32.

        A multi-modal (encoder) model uses `z` when given (one style vector per
        image), else the style images' mu when `style` is given, else z drawn from `seed`.
        """
        instance = None if instance is None else instance.to(self.device)
        ids, edge = class_ids_and_edges(label.to(self.device), self.config, instance)
        if z is not None:
            z = z.to(self.device)
        elif style is not None:
            z = self.encode_style(style)
        elif self.multimodal:
            z = self.style_noise(label.shape[0], seed).to(self.device)
        if self.fast:
            return self.generator(ids, edge, z)
        with autocast_for(self.precision, self.device):
            out = self.generator(one_hot_input(ids, edge, self.config), z)
        return out.float()

    def synthesize_inputs(
        self, inputs: list[LabelInput], *, style: torch.Tensor | None = None, seed: int = 0
    ) -> torch.Tensor:
        label = torch.stack([i.label for i in inputs])
        instance = torch.stack([i.instance for i in inputs]) if self.config.use_instance else None
        if style is not None:
            style = style.expand(len(inputs), -1, -1, -1)
        return self.synthesize(label, instance, style=style, seed=seed)


def pair_by_stem(label_dir: Path, instance_dir: Path | None) -> list[tuple[Path, Path | None]]:
    """Label files of a directory with their instance partners (same file stem)."""
    if not label_dir.is_dir():
        raise SpadeError(f"label directory not found: {label_dir}")
    labels = sorted(p for p in label_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not labels:
        raise SpadeError(f"{label_dir}: no label images ({', '.join(IMAGE_SUFFIXES)}) found")
    if instance_dir is None:
        return [(p, None) for p in labels]
    if not instance_dir.is_dir():
        raise SpadeError(f"instance directory not found: {instance_dir}")
    instances = {p.stem: p for p in instance_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    missing = [p.name for p in labels if p.stem not in instances]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise SpadeError(f"{instance_dir}: no instance map for label file(s) {shown}")
    return [(p, instances[p.stem]) for p in labels]


def batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
