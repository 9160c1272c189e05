"""Typed model settings.

`ModelConfig` is everything needed to rebuild the networks of a checkpoint: the
label conventions (class count, don't-care, instance edges) and the architecture.
It is stored inside every project checkpoint, so a checkpoint is self-describing.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

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
        if (
            self.spade_norm == "instance"
            and self.num_upsampling_layers in UPSAMPLING_LAYERS
            and self.latent_size == (1, 1)
        ):
            problems.append(
                f"spade_norm 'instance' cannot normalise the 1x1 first feature map of crop_size {self.crop_size}; "
                "use a larger crop_size or batch norm"
            )
        if self.ngf < 2 or self.ndf < 1 or self.z_dim < 1 or self.num_D < 1 or self.n_layers_D < 1:
            problems.append("ngf >= 2, ndf, z_dim, num_D and n_layers_D >= 1 are required")
        if problems:
            raise SpadeError("invalid model settings: " + "; ".join(problems))

    @property
    def onehot_nc(self) -> int:
        """One-hot class channels: the classes and the don't-care class where there is one."""
        return self.label_nc + int(self.contain_dontcare_label)

    @property
    def semantic_nc(self) -> int:
        """Every channel of the generator input: the one-hot classes and the instance-edge channel."""
        return self.onehot_nc + int(self.use_instance)

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


LAYOUTS = ("coco", "ade20k", "cityscapes", "custom")
PREPROCESS_MODES = ("resize_and_crop", "scale_width_and_crop", "scale_shortside_and_crop", "fixed", "none")


@dataclass(frozen=True)
class DataConfig:
    """Where the training data is and how it is read.

    `layout` names the folder convention (see spade/data/layouts.py). For `custom`
    (also what the built-in dataset and the pseudo-labeling stage write) the folders
    default to {split}_label, {split}_img and, when present, {split}_inst under `root`.
    """

    layout: str = "custom"
    root: str = "data/builtin"
    split: str = "train"
    label_dir: str = ""
    image_dir: str = ""
    instance_dir: str = ""
    preprocess_mode: str = "resize_and_crop"
    load_size: int = 286
    no_flip: bool = False
    skip_bad: bool = False
    # training loader processes; auto: none on CPU (they would take cores from the model), a few per GPU
    num_workers: int | str = "auto"
    max_samples: int = 0

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise SpadeError(f"data.layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.preprocess_mode not in PREPROCESS_MODES:
            raise SpadeError(
                f"data.preprocess_mode must be one of {', '.join(PREPROCESS_MODES)}, got {self.preprocess_mode!r}"
            )
        if self.split not in ("train", "val"):
            raise SpadeError(f"data.split must be train or val, got {self.split!r}")
        workers = self.num_workers
        if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise SpadeError(f"data.num_workers must be auto or a whole number >= 0, got {workers!r}")
        if self.load_size < 1 or self.max_samples < 0:
            raise SpadeError("data.load_size must be >= 1 and data.max_samples >= 0")


# synthesis / serving / evaluation run float32 or bfloat16; training may also use float16 (CUDA). "auto" is resolved
# by spade.precision. Kept here, free of torch, so that building the command line imports no torch.
INFERENCE_PRECISIONS = ("float32", "bfloat16")
PRECISION_CHOICES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, checkpointing and logging settings of `spade train`.

    `batch_size` is the global batch: with N processes each takes batch_size / N.
    The learning rate is constant until `lr_decay_start` (a fraction of
    `iterations`), then falls linearly to 0. With TTUR (the default) G uses lr / 2
    and D lr * 2, with Adam betas (0, 0.9); without it both use lr and (0.5, 0.999).
    """

    out_dir: str = "runs/train"
    iterations: int = 1000
    batch_size: int = 8
    lr: float = 0.0002
    ttur: bool = True
    beta1: float | None = None
    beta2: float | None = None
    lr_decay_start: float = 0.5
    d_steps_per_g: int = 1
    gan_mode: str = "hinge"
    lambda_feat: float = 10.0
    lambda_vgg: float = 10.0
    lambda_kld: float = 0.05
    feat_loss: bool = True
    vgg_loss: bool = True
    vgg_weights: str = ""
    init_gain: float = 0.02
    precision: str = "auto"  # auto: bfloat16 autocast where the device runs bf16 natively, else float32
    channels_last: bool = True  # with bf16 / fp16 only: float32 stays NCHW (the exact path)
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    checkpoint_dir: str = ""
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    sample_every: int = 250
    num_samples: int = 4

    def __post_init__(self) -> None:
        problems = []
        if self.iterations < 1 or self.batch_size < 1 or self.d_steps_per_g < 1:
            problems.append("iterations, batch_size and d_steps_per_g must be >= 1")
        if not 0.0 <= self.lr_decay_start <= 1.0:
            problems.append(f"lr_decay_start is a fraction of iterations in [0, 1], got {self.lr_decay_start}")
        if self.precision not in PRECISION_CHOICES:
            problems.append(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}")
        if self.gan_mode not in ("hinge", "ls", "original", "w"):
            problems.append(f"gan_mode must be hinge, ls, original or w, got {self.gan_mode!r}")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.log_every < 1 or self.sample_every < 0:
            problems.append("checkpoint_every, keep_checkpoints and log_every must be >= 1, sample_every >= 0")
        if problems:
            raise SpadeError("invalid train settings: " + "; ".join(problems))

    @property
    def betas(self) -> tuple[float, float]:
        default = (0.0, 0.9) if self.ttur else (0.5, 0.999)
        return (
            default[0] if self.beta1 is None else self.beta1,
            default[1] if self.beta2 is None else self.beta2,
        )

    @property
    def lr_G(self) -> float:
        return self.lr / 2 if self.ttur else self.lr

    @property
    def lr_D(self) -> float:
        return self.lr * 2 if self.ttur else self.lr

    def lr_factor(self, iteration: int) -> float:
        """Multiplier of the base learning rates at an iteration (linear decay to 0)."""
        start = self.lr_decay_start * self.iterations
        if iteration < start or self.iterations <= start:
            return 1.0
        return max(0.0, (self.iterations - iteration) / (self.iterations - start))

    @property
    def checkpoint_location(self) -> str:
        return self.checkpoint_dir or f"{self.out_dir.rstrip('/')}/checkpoints"


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow settings. An empty tracking_uri means $MLFLOW_TRACKING_URI, else a SQLite file here."""

    tracking_uri: str = ""
    experiment: str = "spade"
    run_name: str = ""
    enabled: bool = True
    retry_seconds: float = 5.0
    close_timeout: float = 60.0


@dataclass(frozen=True)
class RegisterConfig:
    """`spade register`: where archives are stored and the gate a new version passes to become `champion`.

    `store` is a folder or s3://bucket/prefix. A candidate passes when its FID is at most the champion's
    plus `fid_tolerance` and its mIoU at least the champion's minus `miou_tolerance` (a metric missing on
    either side is not compared; at least one must be). `fid_key` and `miou_key` name the values in the
    evaluation's metrics.json. An empty `model_name` takes the archive's model name; an empty
    `torchserve_url` skips TorchServe (its token comes from $TORCHSERVE_MANAGEMENT_TOKEN or --torchserve-token).
    """

    model_name: str = ""
    store: str = "runs/model-store"
    fid_tolerance: float = 0.5
    miou_tolerance: float = 0.005
    fid_key: str = "fid"
    miou_key: str = "mIoU"
    torchserve_url: str = ""
    torchserve_timeout: float = 300.0

    def __post_init__(self) -> None:
        problems = []
        if not self.store:
            problems.append("store must name a folder or s3://bucket/prefix")
        for name in ("fid_tolerance", "miou_tolerance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                problems.append(f"{name} must be a number >= 0, got {value!r}")
        if not self.fid_key or not self.miou_key:
            problems.append("fid_key and miou_key must name keys of metrics.json")
        if not self.torchserve_timeout > 0:
            problems.append(f"torchserve_timeout must be > 0 seconds, got {self.torchserve_timeout!r}")
        if problems:
            raise SpadeError("invalid register settings: " + "; ".join(problems))


@dataclass(frozen=True)
class Settings:
    """Everything `params.yaml` holds, typed. Sections: model, data, train, tracking, register."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "data": asdict(self.data),
            "train": asdict(self.train),
            "tracking": asdict(self.tracking),
            "register": asdict(self.register),
        }

    @classmethod
    def from_dict(cls, raw: dict) -> Settings:
        sections = {
            "model": ModelConfig,
            "data": DataConfig,
            "train": TrainConfig,
            "tracking": TrackingConfig,
            "register": RegisterConfig,
        }
        raw = dict(raw or {})
        values = {}
        for name, section_cls in sections.items():
            body = dict(raw.pop(name, None) or {})
            if name == "model":
                preset = body.pop("preset", "custom")
                values[name] = ModelConfig.from_preset(preset, **body) if body else ModelConfig.from_preset(preset)
                continue
            known = {f.name for f in fields(section_cls)}
            unknown = sorted(set(body) - known)
            if unknown:
                raise SpadeError(f"unknown {name} settings: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
            try:
                values[name] = section_cls(**body)
            except TypeError as exc:
                raise SpadeError(f"bad {name} settings: {exc}") from None
        # other top-level sections (e.g. builtin, evaluate) belong to other stages
        return cls(**values)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply 'section.key=value' strings (values parsed as YAML) to a params dict."""
    import yaml

    out = {k: dict(v) if isinstance(v, dict) else v for k, v in (raw or {}).items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise SpadeError(f"override {item!r} must look like section.key=value, e.g. train.iterations=200")
        section, name = parts
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            raise SpadeError(f"override {item!r}: {section} is not a section")
        out[section][name] = yaml.safe_load(value) if value.strip() else ""
    return out


def load_params(path: str | Path | None) -> dict:
    """params.yaml as a dict ({} when path is None)."""
    import yaml

    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise SpadeError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SpadeError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise SpadeError(f"{path}: expected a mapping of sections at the top level")
    return data


def add_settings_arguments(
    parser,
    *,
    example: str = "train.iterations=500",
    params_help: str = "settings file (default: ./params.yaml when present)",
) -> None:
    """`--params FILE` and repeatable `--set SECTION.KEY=VALUE`, as every command that reads params.yaml takes them."""
    parser.add_argument("--params", type=Path, help=params_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override one setting, e.g. {example} (repeatable)",
    )


def add_precision_argument(parser, *, what: str = "") -> None:
    """`--precision auto|float32|bfloat16` (default auto), as every command that synthesizes takes it."""
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", *INFERENCE_PRECISIONS),
        help=f"{what}auto (default): bfloat16 where the device runs it natively, else float32; float32: the exact path",
    )


def params_path(path: str | Path | None) -> Path | None:
    """The settings file a command reads: the one named, else ./params.yaml when there is one."""
    if path is not None:
        return Path(path)
    return Path("params.yaml") if Path("params.yaml").is_file() else None


def load_settings(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Settings:
    return Settings.from_dict(apply_overrides(load_params(path), overrides or []))
