"""`spade convert-official` and `spade synthesize` end to end, on COCO-Stuff label maps."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reference_forward as ref
from official_states import random_state
from spade.checkpoints import Checkpoint
from spade.cli import main
from spade.config import ModelConfig
from spade.labels import semantic_input
from spade.nn import ConvEncoder, SPADEGenerator
from spade.synthesize import prepare_label

SPADE_BIN = Path(sys.executable).parent / "spade"


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def official_coco(tmp_path_factory):
    """The authors' file format: a bare generator state dict, converted with the CLI."""
    root = tmp_path_factory.mktemp("official")
    state = random_state("coco", "generator", seed=5)
    torch.save(state, root / "latest_net_G.pth")
    assert (
        main(
            [
                "convert-official",
                "--preset",
                "coco",
                "--generator",
                str(root / "latest_net_G.pth"),
                "--output",
                str(root / "coco.pt"),
            ]
        )
        == 0
    )
    return root / "coco.pt", state


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A small multi-modal coco-preset checkpoint (encoder included)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("coco", ngf=8, crop_size=64, use_vae=True, z_dim=16)
    ckpt = Checkpoint(
        config=cfg,
        generator=SPADEGenerator.from_config(cfg).state_dict(),
        encoder=ConvEncoder.from_config(cfg).state_dict(),
    )
    return ckpt.save(tmp_path_factory.mktemp("tiny") / "tiny_vae.pt")


def val_pair(sample: Path, index: int = 0) -> tuple[Path, Path]:
    label = sorted((sample / "val_label").glob("*.png"))[index]
    return label, sample / "val_inst" / label.name


def test_single_label_map_matches_the_reference_pipeline(official_coco, coco_sample, tmp_path, capsys):
    ckpt, state = official_coco
    label, inst = val_pair(coco_sample)
    out = tmp_path / "out.png"
    code, stdout, _ = run_cli(
        capsys, "synthesize", "--checkpoint", ckpt, "--label", label, "--instance", inst, "--output", out
    )
    assert code == 0 and "wrote" in stdout
    result = np.asarray(Image.open(out))
    assert result.shape == (256, 256, 3) and result.dtype == np.uint8

    # the reference's test-time preprocessing, by hand: PIL nearest resize to 256x256, 255 -> 182
    raw = np.asarray(Image.open(label).resize((256, 256), Image.NEAREST)).astype(np.int64)
    ids = np.where(raw == 255, 182, raw)
    inst_ids = np.asarray(Image.open(inst).resize((256, 256), Image.NEAREST)).astype(np.int64)
    cfg = ModelConfig.from_preset("coco")
    seg = semantic_input(torch.from_numpy(ids)[None, None], cfg, torch.from_numpy(inst_ids)[None, None])
    expected = ref.generator(state, seg, latent=(8, 8), more=False)
    expected = ((expected[0] + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(result.astype(int) - expected.astype(int)).max() <= 1


def test_resize_back_to_the_label_size(official_coco, coco_sample, tmp_path, capsys):
    label, inst = val_pair(coco_sample, 1)
    out = tmp_path / "big.png"
    code, _, _ = run_cli(
        capsys,
        "synthesize",
        "--checkpoint",
        official_coco[0],
        "--label",
        label,
        "--instance",
        inst,
        "--output",
        out,
        "--resize-to-label",
    )
    assert code == 0
    assert Image.open(out).size == Image.open(label).size


def test_directory_mode_pairs_by_stem_with_a_progress_bar(official_coco, coco_sample, tmp_path, capsys):
    # three maps of the sample (full-size coco synthesis is seconds per image on a CPU)
    labels, insts = tmp_path / "labels", tmp_path / "insts"
    labels.mkdir()
    insts.mkdir()
    for label in sorted((coco_sample / "val_label").glob("*.png"))[:3]:
        (labels / label.name).write_bytes(label.read_bytes())
        (insts / label.name).write_bytes((coco_sample / "val_inst" / label.name).read_bytes())
    out_dir = tmp_path / "results"
    code, stdout, err = run_cli(
        capsys,
        "synthesize",
        "--checkpoint",
        official_coco[0],
        "--label",
        labels,
        "--instance",
        insts,
        "--output",
        out_dir,
        "--batch-size",
        "2",
    )
    assert code == 0
    stems = sorted(p.stem for p in labels.glob("*.png"))
    assert sorted(p.stem for p in out_dir.glob("*.png")) == stems
    assert all(Image.open(p).size == (256, 256) for p in out_dir.glob("*.png"))
    assert f"{len(stems)}/{len(stems)}" in err  # tqdm's bar on stderr
    assert f"wrote {len(stems)} image(s)" in stdout


def test_directory_mode_names_labels_without_instance_partner(official_coco, coco_sample, tmp_path, capsys):
    inst_dir = tmp_path / "inst"
    inst_dir.mkdir()
    first, *rest = sorted((coco_sample / "val_inst").glob("*.png"))
    (inst_dir / first.name).write_bytes(first.read_bytes())
    code, _, err = run_cli(
        capsys,
        "synthesize",
        "--checkpoint",
        official_coco[0],
        "--label",
        coco_sample / "val_label",
        "--instance",
        inst_dir,
        "--output",
        tmp_path / "o",
    )
    assert code == 1
    assert "no instance map for label file(s)" in err and rest[0].name in err
    assert not (tmp_path / "o").exists()


def test_seeds_give_different_images_and_style_uses_the_encoded_mean(tiny_vae, coco_sample, tmp_path, capsys):
    label, inst = val_pair(coco_sample)
    outs = {}
    for seed in (1, 2, 1):
        out = tmp_path / f"s{seed}.png"
        assert (
            run_cli(
                capsys,
                "synthesize",
                "--checkpoint",
                tiny_vae,
                "--label",
                label,
                "--instance",
                inst,
                "--seed",
                seed,
                "--output",
                out,
            )[0]
            == 0
        )
        outs.setdefault(seed, []).append(np.asarray(Image.open(out)).astype(int))
    assert np.array_equal(outs[1][0], outs[1][1])
    assert np.abs(outs[1][0] - outs[2][0]).mean() > 1.0

    style = sorted((coco_sample / "val_img").glob("*.jpg"))[0]
    out = tmp_path / "styled.png"
    assert (
        run_cli(
            capsys,
            "synthesize",
            "--checkpoint",
            tiny_vae,
            "--label",
            label,
            "--instance",
            inst,
            "--style",
            style,
            "--precision",
            "float32",  # the exact path, compared with the reference computation below
            "--output",
            out,
        )[0]
        == 0
    )
    ckpt = Checkpoint.load(tiny_vae)
    cfg = ckpt.config
    item = prepare_label(cfg, label, inst)
    # the style image as the reference's test transform reads it, written here with PIL alone: RGB, bicubic
    # resize to the model's (height, width), then (x / 255 - 0.5) / 0.5 per channel
    h, w = cfg.output_size
    with Image.open(style) as img:
        pixels = np.asarray(img.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float64)
    style_input = torch.from_numpy((pixels / 255.0 - 0.5) / 0.5).float().permute(2, 0, 1)
    with torch.no_grad():
        mu, _ = ckpt.build_encoder()(style_input[None])
        image = ckpt.build_generator()(semantic_input(item.label[None], cfg, item.instance[None]), mu)
    expected = ((image[0] + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(Image.open(out)).astype(int) - expected.astype(int)).max() <= 1


def write_label(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("out_of_range", r"bad.png: label values 190, 200 are out of range for the coco model with 182 classes"),
        ("unreadable", r"bad.png: cannot read label map"),
        ("rgb", r"bad.png: label map must be a single-channel image .*got mode RGB"),
        ("size_mismatch", r"inst.png: instance map is 20x10 but label map .*bad.png is 16x16"),
        ("wrong_preset", r"is a coco checkpoint, not ade20k"),
        ("style_without_encoder", r"has no image encoder, so --style cannot be used"),
        ("missing", r"bad.png: no such file"),
    ],
)
def test_bad_input_gives_one_clear_line_and_a_nonzero_exit(official_coco, tmp_path, capsys, case, message):
    label = tmp_path / "bad.png"
    extra: list[object] = []
    ids = np.full((16, 16), 5, np.uint8)
    if case == "out_of_range":
        ids[0, :3] = [190, 200, 255]
        write_label(label, ids)
    elif case == "unreadable":
        label.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    elif case == "rgb":
        Image.new("RGB", (16, 16)).save(label)
    elif case == "size_mismatch":
        write_label(label, ids)
        extra = ["--instance", write_label(tmp_path / "inst.png", np.zeros((10, 20), np.uint8))]
    elif case == "wrong_preset":
        write_label(label, ids)
        extra = ["--preset", "ade20k"]
    elif case == "style_without_encoder":
        write_label(label, ids)
        Image.new("RGB", (16, 16)).save(tmp_path / "style.jpg")
        extra = ["--style", tmp_path / "style.jpg"]
    code, stdout, err = run_cli(
        capsys, "synthesize", "--checkpoint", official_coco[0], "--label", label, "--output", tmp_path / "o.png", *extra
    )
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "o.png").exists()


def test_raw_official_file_given_to_synthesize_says_convert_first(tmp_path, capsys):
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "latest_net_G.pth")
    write_label(tmp_path / "l.png", np.zeros((8, 8), np.uint8))
    code, _, err = run_cli(
        capsys, "synthesize", "--checkpoint", tmp_path / "latest_net_G.pth", "--label", tmp_path / "l.png"
    )
    assert code == 1 and "spade convert-official" in err


def test_convert_official_reports_the_other_preset(tmp_path, capsys):
    torch.save(random_state("cityscapes", "generator"), tmp_path / "G.pth")
    code, _, err = run_cli(
        capsys, "convert-official", "--preset", "coco", "--generator", tmp_path / "G.pth", "--output", tmp_path / "x.pt"
    )
    assert code == 1 and "is a cityscapes generator, not coco" in err
    assert not (tmp_path / "x.pt").exists()


def test_console_script_help_has_examples():
    top = subprocess.run([SPADE_BIN, "--help"], capture_output=True, text=True, check=True).stdout
    assert "synthesize" in top and "convert-official" in top
    for command in ("synthesize", "convert-official", "presets"):
        text = subprocess.run([SPADE_BIN, command, "--help"], capture_output=True, text=True, check=True).stdout
        assert "examples:" in text and f"spade {command}" in text
    listing = subprocess.run([SPADE_BIN, "presets"], capture_output=True, text=True, check=True).stdout
    assert "cityscapes" in listing and "512x256" in listing
    bad = subprocess.run([sys.executable, "-m", "spade", "synthesize"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--checkpoint" in bad.stderr
