"""Named presets: the authors' public configurations and a `custom` starting point.

A preset carries everything that belongs together for a dataset family: how many
classes the label maps have, whether a don't-care class and an instance-edge
channel are used, the output resolution and upsampling variant, and the test-time
preprocessing that the authors' release applies before synthesis.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from spade.errors import SpadeError


@dataclass(frozen=True)
class Preset:
    """A dataset family's model and preprocessing settings.

    `label_offset` converts raw label-file values to class ids: ADE20K files store
    0 for "unlabeled" and 1..150 for classes, so its offset is -1 and raw 0 becomes
    the don't-care class. A raw value of 255 always means don't-care.
    """

    name: str
    label_nc: int
    contain_dontcare_label: bool
    use_instance: bool
    crop_size: int
    load_size: int
    aspect_ratio: float
    num_upsampling_layers: str
    preprocess_mode: str
    label_offset: int = 0
    description: str = ""

    @property
    def semantic_nc(self) -> int:
        """Channels into every SPADE layer: classes, don't-care, instance edges."""
        return self.label_nc + int(self.contain_dontcare_label) + int(self.use_instance)

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of synthesized images."""
        return round(self.crop_size / self.aspect_ratio), self.crop_size

    def with_overrides(self, **changes: object) -> Preset:
        return replace(self, **changes)


COCO = Preset(
    name="coco",
    label_nc=182,
    contain_dontcare_label=True,
    use_instance=True,
    crop_size=256,
    load_size=286,
    aspect_ratio=1.0,
    num_upsampling_layers="normal",
    preprocess_mode="resize_and_crop",
    description="COCO-Stuff: 182 classes, 255 = unlabeled, instance maps, 256x256",
)

ADE20K = Preset(
    name="ade20k",
    label_nc=150,
    contain_dontcare_label=True,
    use_instance=False,
    crop_size=256,
    load_size=286,
    aspect_ratio=1.0,
    num_upsampling_layers="normal",
    preprocess_mode="resize_and_crop",
    label_offset=-1,
    description="ADE20K (ADEChallengeData2016): files hold 0 = unlabeled, 1..150; 256x256",
)

CITYSCAPES = Preset(
    name="cityscapes",
    label_nc=35,
    contain_dontcare_label=False,
    use_instance=True,
    crop_size=512,
    load_size=512,
    aspect_ratio=2.0,
    num_upsampling_layers="more",
    preprocess_mode="fixed",
    description="Cityscapes gtFine labelIds (35 ids) with instanceIds; 512x256",
)

CUSTOM = Preset(
    name="custom",
    label_nc=8,
    contain_dontcare_label=True,
    use_instance=False,
    crop_size=256,
    load_size=286,
    aspect_ratio=1.0,
    num_upsampling_layers="normal",
    preprocess_mode="resize_and_crop",
    description="Your own label maps: set label_nc (and the rest) to match your data",
)

PRESETS: dict[str, Preset] = {p.name: p for p in (COCO, ADE20K, CITYSCAPES, CUSTOM)}
OFFICIAL_PRESETS = ("coco", "ade20k", "cityscapes")


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise SpadeError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
