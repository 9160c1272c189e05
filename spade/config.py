"""Typed model settings.

`ModelConfig` is everything needed to rebuild the networks of a checkpoint: the
label conventions (class count, don't-care, instance edges) and the architecture.
It is stored inside every project checkpoint, so a checkpoint is self-describing.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

from spade.errors import SpadeError
from spade.presets import Preset, get_preset

UPSAMPLING_LAYERS = {"normal": 5, "more": 6, "most": 7}
PARAM_FREE_NORMS = ("instance", "batch", "syncbatch")
DISCRIMINATOR_NORMS = ("instance", "batch", "none")


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "coco"
    label_nc: int = 182
    contain_dontcare_label: bool = True
    use_instance: bool = True
    label_offset: int = 0
    crop_size: int = 256
    aspect_ratio: float = 1.0
    num_upsampling_layers: str = "normal"
    ngf: int = 64
    ndf: int = 64
    z_dim: int = 256
    use_vae: bool = False
    spade_norm: str = "syncbatch"
    spade_kernel: int = 3
    spade_hidden: int = 128
    spectral_G: bool = True
    norm_D: str = "instance"
    spectral_D: bool = True
    num_D: int = 2
    n_layers_D: int = 4
    norm_E: str = "instance"
    spectral_E: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.label_nc < 1:
            problems.append(f"label_nc must be >= 1, got {self.label_nc}")
        if self.num_upsampling_layers not in UPSAMPLING_LAYERS:
            problems.append(
                f"num_upsampling_layers must be one of {sorted(UPSAMPLING_LAYERS)}, got {self.num_upsampling_layers!r}"
            )
        if self.spade_norm not in PARAM_FREE_NORMS:
            problems.append(f"spade_norm must be one of {PARAM_FREE_NORMS}, got {self.spade_norm!r}")
        if self.spade_kernel not in (1, 3, 5):
            problems.append(f"spade_kernel must be 1, 3 or 5, got {self.spade_kernel}")
        for name in ("norm_D", "norm_E"):
            if getattr(self, name) not in DISCRIMINATOR_NORMS:
                problems.append(f"{name} must be one of {DISCRIMINATOR_NORMS}, got {getattr(self, name)!r}")
        if self.num_upsampling_layers in UPSAMPLING_LAYERS:
            factor = 2 ** UPSAMPLING_LAYERS[self.num_upsampling_layers]
            if self.crop_size % factor or self.latent_size[0] < 1:
                problems.append(
                    f"crop_size {self.crop_size} must be a multiple of {factor} for "
                    f"{self.num_upsampling_layers!r} upsampling (and leave a latent grid of at least 1 row "
                    f"at aspect ratio {self.aspect_ratio})"
                )
        if self.ngf < 2 or self.ndf < 1 or self.z_dim < 1 or self.num_D < 1 or self.n_layers_D < 1:
            problems.append("ngf >= 2, ndf, z_dim, num_D and n_layers_D >= 1 are required")
        if problems:
            raise SpadeError("invalid model settings: " + "; ".join(problems))

    @property
    def semantic_nc(self) -> int:
        return self.label_nc + int(self.contain_dontcare_label) + int(self.use_instance)

    @property
    def num_up(self) -> int:
        return UPSAMPLING_LAYERS[self.num_upsampling_layers]

    @property
    def latent_size(self) -> tuple[int, int]:
        """(height, width) of the generator's first feature map."""
        sw = self.crop_size // 2**self.num_up
        return round(sw / self.aspect_ratio), sw

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the synthesized image."""
        sh, sw = self.latent_size
        return sh * 2**self.num_up, sw * 2**self.num_up

    @property
    def dontcare_id(self) -> int | None:
        return self.label_nc if self.contain_dontcare_label else None

    @classmethod
    def from_preset(cls, preset: str | Preset, **overrides: object) -> ModelConfig:
        p = get_preset(preset) if isinstance(preset, str) else preset
        values: dict[str, object] = dict(
            preset=p.name,
            label_nc=p.label_nc,
            contain_dontcare_label=p.contain_dontcare_label,
            use_instance=p.use_instance,
            label_offset=p.label_offset,
            crop_size=p.crop_size,
            aspect_ratio=p.aspect_ratio,
            num_upsampling_layers=p.num_upsampling_layers,
        )
        values.update(overrides)
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpadeError(f"unknown model settings: {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_official_options(cls, preset: str, options: dict, **overrides: object) -> ModelConfig:
        """Settings from the option names of the authors' release (e.g. norm_G='spectralspadesyncbatch3x3')."""
        spectral_g, spade_norm, kernel = parse_spade_norm(options["norm_G"])
        values = dict(
            label_nc=options["label_nc"],
            contain_dontcare_label=options["contain_dontcare_label"],
            use_instance=not options["no_instance"],
            crop_size=options["crop_size"],
            aspect_ratio=float(options["aspect_ratio"]),
            num_upsampling_layers=options["num_upsampling_layers"],
            ngf=options["ngf"],
            ndf=options["ndf"],
            z_dim=options["z_dim"],
            use_vae=options["use_vae"],
            spade_norm=spade_norm,
            spade_kernel=kernel,
            spectral_G=spectral_g,
            num_D=options["num_D"],
            n_layers_D=options["n_layers_D"],
        )
        for net in ("D", "E"):
            spectral, norm = parse_plain_norm(options[f"norm_{net}"])
            values[f"spectral_{net}"] = spectral
            values[f"norm_{net}"] = norm
        values.update(overrides)
        return cls.from_preset(preset, **values)


def parse_spade_norm(text: str) -> tuple[bool, str, int]:
    """'spectralspadesyncbatch3x3' -> (spectral, 'syncbatch', 3)."""
    m = re.fullmatch(r"(spectral)?spade(instance|syncbatch|batch)(\d)x\d", text)
    if not m:
        raise SpadeError(f"unrecognised generator norm {text!r}")
    return bool(m.group(1)), m.group(2), int(m.group(3))


def parse_plain_norm(text: str) -> tuple[bool, str]:
    """'spectralinstance' -> (True, 'instance')."""
    m = re.fullmatch(r"(spectral)?(instance|batch|syncbatch|none)", text)
    if not m:
        raise SpadeError(f"unrecognised norm {text!r}")
    norm = "batch" if m.group(2) == "syncbatch" else m.group(2)
    return bool(m.group(1)), norm
