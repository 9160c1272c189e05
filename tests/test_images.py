"""Image bombs: every reader of image files refuses one before decoding it, naming the file and the limit.

A bomb here is a real PNG whose header claims 20000 x 20000 pixels (400 Mpx: past Pillow's own error
threshold) or 9000 x 9000 (81 Mpx: past spade's 67 Mpx limit but short of Pillow's thresholds, so only
spade's own check can stop it). Decoding either would take 81-400 MB for a grey map, three times that as
RGB; the file itself is under 200 bytes.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_builders import bomb_png, make_flat
from spade.config import DataConfig, ModelConfig
from spade.data.dataset import check_samples, read_photo
from spade.data.layouts import find_pairs
from spade.errors import SpadeError
from spade.evaluate.fid import load_image
from spade.evaluate.segmenters.small import _read_photo
from spade.images import DEFAULT_MAX_PIXELS, ENV_NAME, ImageTooLarge, max_pixels
from spade.labels import read_id_map
from spade.serve.protocol import RequestError, decode_image
from spade.synthesize import read_rgb

SIZES = {"past-pillow": (20000, 20000), "past-spade-only": (9000, 9000)}


def test_the_default_limit_is_below_both_bombs_and_above_real_photos():
    # the argument of this file: one bomb only spade's check stops, one Pillow would stop too
    assert 4000 * 6000 < DEFAULT_MAX_PIXELS < 9000 * 9000 < Image.MAX_IMAGE_PIXELS < 20000 * 20000


READERS = {
    "label map": lambda p: read_id_map(p, "label map"),
    "dataset photo": read_photo,
    "synthesize style image": lambda p: read_rgb(p, (32, 32), what="style image"),
    "FID image": load_image,
    "segmenter photo": _read_photo,
}


@pytest.mark.parametrize("bomb", sorted(SIZES))
@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_file_reader_refuses_a_bomb_naming_file_size_and_limit(tmp_path, reader, bomb):
    w, h = SIZES[bomb]
    path = bomb_png(tmp_path / "bomb.png", w, h)
    with pytest.raises(ImageTooLarge) as err:
        READERS[reader](path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and f"{w * h} pixels" in msg and f"limit of {DEFAULT_MAX_PIXELS}" in msg
    assert ENV_NAME in msg
    assert isinstance(err.value, SpadeError)  # the command line prints it as one line


def test_the_limit_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # raised below: restored after
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((10, 11), np.uint8)).save(small)
    monkeypatch.setenv(ENV_NAME, "110")
    assert max_pixels() == 110 and read_id_map(small).shape == (10, 11)
    monkeypatch.setenv(ENV_NAME, "109")
    with pytest.raises(ImageTooLarge, match="11x10 = 110 pixels, more than the limit of 109"):
        read_id_map(small)
    monkeypatch.setenv(ENV_NAME, "lots")
    with pytest.raises(SpadeError, match=f"{ENV_NAME} must be a positive number of pixels"):
        max_pixels()
    # raised above Pillow's own threshold, the 400 Mpx header is read (and fails on its missing pixel rows)
    monkeypatch.setenv(ENV_NAME, str(500_000_000))
    with pytest.raises(SpadeError, match="cannot read label map") as err:
        read_id_map(bomb_png(tmp_path / "bomb.png"))
    assert not isinstance(err.value, ImageTooLarge)


@pytest.mark.parametrize("bomb", sorted(SIZES))
def test_uploads_to_the_service_and_the_studio_get_413(tmp_path, bomb):
    from spade.serve.studio import decode_label

    w, h = SIZES[bomb]
    data = bomb_png(tmp_path / "bomb.png", w, h).read_bytes()
    with pytest.raises(RequestError) as err:
        decode_image(data, "'label'", 10**12)  # a generous serving limit: spade's decode limit still holds
    assert err.value.status == 413 and f"{w * h} pixels" in str(err.value)
    info = {"classes": [{"value": 0}], "width": 32, "height": 32, "max_pixels": 10**12}
    with pytest.raises(RequestError) as err:
        decode_label(data, info)
    assert err.value.status == 413 and f"the limit is {DEFAULT_MAX_PIXELS}" in str(err.value)


def bomb_dataset(root: Path) -> dict[str, Path]:
    """Four coco-layout samples: one label map and one photo are bombs."""
    make_flat(root, n=4, size=(32, 32))
    return {
        "label": bomb_png(root / "train_label" / "000001.png"),
        "photo": bomb_png(root / "train_img" / "000002.jpg", 9000, 9000, mode="RGB"),  # content decides, not suffix
    }


def test_dataset_check_names_bombs_and_skip_bad_counts_them(tmp_path):
    bombs = bomb_dataset(tmp_path)
    samples = find_pairs(DataConfig(layout="coco", root=str(tmp_path)))
    model = ModelConfig.from_preset("coco", crop_size=32)
    with pytest.raises(SpadeError) as err:
        check_samples(samples, model, skip_bad=False, progress=False)
    msg = str(err.value)
    assert msg.startswith("2 of 4 sample(s)")
    assert f"{bombs['label']}: label map is 400000000 pixels, more than the limit" in msg
    assert f"{bombs['photo']}: image is 9000x9000 = 81000000 pixels, more than the limit" in msg
    good, problems = check_samples(samples, model, skip_bad=True, progress=False)
    assert [s.name for s in good] == ["000000", "000003"]
    assert sorted(p.split(": ")[0] for p in problems) == sorted(str(p) for p in bombs.values())


def test_spade_train_stops_with_one_line_and_skip_bad_trains_on_the_rest(tmp_path, monkeypatch, capsys):
    """The command line as a user runs it: before this guard, a worker thread died with a traceback."""
    from spade.cli import main

    bombs = bomb_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    common = ["train", "--data", "data", "--no-vgg-loss", "--no-tracking", "--iterations", "1", "--batch-size", "2"]
    sets = ["--set=model.crop_size=32", "--set=model.ngf=8", "--set=model.ndf=8", "--set=data.load_size=32"]
    assert main([*common, *sets, "--out", "runs/a"]) == 1
    err = capsys.readouterr().err
    label = bombs["label"].relative_to(tmp_path)  # as the user named it: --data data
    assert "Traceback" not in err and f"{label}: label map is 400000000 pixels" in err
    assert main([*common, *sets, "--out", "runs/b", "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "data: skipped 2 bad or unpaired file(s)" in err
    assert (tmp_path / "runs" / "b" / "final.pt").is_file()


def test_spade_synthesize_on_a_bomb_exits_with_one_line(tmp_path, capsys):
    from spade.checkpoints import Checkpoint
    from spade.cli import main
    from spade.nn.generator import SPADEGenerator

    cfg = ModelConfig.from_preset("custom", label_nc=4, contain_dontcare_label=False, crop_size=32, ngf=8)
    ckpt = Checkpoint(config=cfg, generator=SPADEGenerator.from_config(cfg).state_dict())
    ckpt.save(tmp_path / "model.pt")
    bomb = bomb_png(tmp_path / "labels" / "a.png")
    for label in (bomb, bomb.parent):  # one file, and directory mode
        code = main(["synthesize", "--checkpoint", str(tmp_path / "model.pt"), "--label", str(label)])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err, err
        assert f"{bomb}: label map is 400000000 pixels" in err


def test_a_base64_bomb_in_a_request_body_is_refused_before_decoding(tmp_path):
    text = base64.b64encode(bomb_png(tmp_path / "b.png").read_bytes()).decode()
    assert len(text) < 300  # what travels is tiny; what it claims is not
    from spade.serve.protocol import decode_base64

    with pytest.raises(RequestError) as err:
        decode_image(decode_base64(text, "label"), "'label'", 4096 * 4096)
    assert err.value.status == 413 and "'label' is 400000000 pixels; the limit is 16777216" in str(err.value)


def test_formats_that_decode_while_opening_are_not_read(tmp_path):
    """An ICO decodes its embedded PNG inside Image.open, before a size can be checked: spade reads only
    PNG, JPEG, BMP, TIFF and WebP, so such a file is refused as unreadable, undecoded."""
    import io as _io

    inner = _io.BytesIO()
    Image.new("L", (64, 64)).save(inner, format="PNG")
    ico = tmp_path / "label.ico"
    Image.open(inner).save(ico, format="ICO", sizes=[(64, 64)])
    assert Image.open(ico).format == "ICO"  # Pillow itself would read it
    with pytest.raises(SpadeError, match="cannot read label map"):
        read_id_map(ico)
