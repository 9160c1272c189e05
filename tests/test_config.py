import pytest

from spade.config import ModelConfig, parse_plain_norm, parse_spade_norm
from spade.errors import SpadeError
from spade.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", ["coco", "ade20k", "cityscapes"])
def test_presets_carry_the_official_options(name, spec):
    opts = spec[name]["options"]
    p = get_preset(name)
    assert p.label_nc == opts["label_nc"]
    assert p.contain_dontcare_label == opts["contain_dontcare_label"]
    assert p.use_instance == (not opts["no_instance"])
    assert p.semantic_nc == opts["semantic_nc"]
    assert p.crop_size == opts["crop_size"]
    assert p.load_size == opts["load_size"]
    assert p.aspect_ratio == opts["aspect_ratio"]
    assert p.num_upsampling_layers == opts["num_upsampling_layers"]
    assert p.preprocess_mode == opts["preprocess_mode"]


@pytest.mark.parametrize("name", ["coco", "ade20k", "cityscapes", "coco_vae"])
def test_official_options_give_the_preset_config(name, spec):
    preset = name.removesuffix("_vae")
    cfg = ModelConfig.from_official_options(preset, spec[name]["options"])
    assert cfg == ModelConfig.from_preset(preset, use_vae=name.endswith("_vae"))
    assert cfg.semantic_nc == spec[name]["options"]["semantic_nc"]


def test_output_sizes():
    assert ModelConfig.from_preset("coco").output_size == (256, 256)
    assert ModelConfig.from_preset("cityscapes").output_size == (256, 512)
    assert ModelConfig.from_preset("cityscapes").latent_size == (4, 8)
    assert ModelConfig.from_preset("custom", crop_size=128, num_upsampling_layers="most").latent_size == (1, 1)


def test_norm_strings():
    assert parse_spade_norm("spectralspadesyncbatch3x3") == (True, "syncbatch", 3)
    assert parse_spade_norm("spadeinstance5x5") == (False, "instance", 5)
    assert parse_plain_norm("spectralinstance") == (True, "instance")
    with pytest.raises(SpadeError):
        parse_spade_norm("spectralgroup3x3")


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"num_upsampling_layers": "many"}, "num_upsampling_layers"),
        ({"spade_kernel": 4}, "spade_kernel"),
        ({"spade_norm": "group"}, "spade_norm"),
        ({"crop_size": 100}, "multiple of 32"),
        ({"label_nc": 0}, "label_nc"),
    ],
)
def test_bad_settings_are_named(changes, words):
    with pytest.raises(SpadeError, match=words):
        ModelConfig.from_preset("custom", **changes)


def test_unknown_settings_and_presets_are_errors():
    with pytest.raises(SpadeError, match="unknown model settings: colour"):
        ModelConfig.from_dict({"colour": 1})
    with pytest.raises(SpadeError, match="unknown preset 'imagenet'"):
        get_preset("imagenet")
    assert set(PRESETS) == {"coco", "ade20k", "cityscapes", "custom"}


def test_config_round_trips_through_a_dict():
    cfg = ModelConfig.from_preset("ade20k", ngf=16, use_vae=True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
