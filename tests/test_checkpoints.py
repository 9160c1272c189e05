import subprocess
import sys

import pytest
import torch

import reference_forward as ref
from official_states import random_state
from spade.checkpoints import NETWORKS, Checkpoint, convert_official
from spade.config import ModelConfig
from spade.errors import SpadeError
from spade.labels import semantic_input


def write_state(path, state):
    torch.save(state, path)
    return path


def blocky_labels(cfg: ModelConfig, seed: int = 0, block: int = 16) -> torch.Tensor:
    h, w = cfg.output_size
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, cfg.label_nc, (1, 1, h // block, w // block), generator=g)
    return small.repeat_interleave(block, 2).repeat_interleave(block, 3)


@pytest.mark.parametrize("preset", ["coco", "cityscapes"])
def test_round_trip_and_eval_output_equals_the_reference_computation(tmp_path, preset):
    state = random_state(preset, "generator", seed=1)
    src = write_state(tmp_path / "latest_net_G.pth", state)
    ckpt = convert_official(preset, src)
    ckpt.save(tmp_path / "model.pt")
    loaded = Checkpoint.load(tmp_path / "model.pt")
    assert loaded.config == ModelConfig.from_preset(preset)
    assert loaded.meta["source"] == "official"
    assert list(loaded.generator) == list(state)
    assert all(torch.equal(loaded.generator[k], v) for k, v in state.items())

    gen = loaded.build_generator()
    assert not gen.training
    cfg = loaded.config
    label = blocky_labels(cfg)
    seg = semantic_input(label, cfg, label if cfg.use_instance else None)
    with torch.no_grad():
        ours = gen(seg)
    expected = ref.generator(state, seg, latent=cfg.latent_size, more=cfg.num_upsampling_layers == "more")
    assert ours.shape == (1, 3, *cfg.output_size)
    assert (ours - expected).abs().max().item() <= 1e-4
    # the comparison is meaningful: outputs vary and are not saturated by tanh
    assert ours.std() > 0.01 and (ours.abs() > 0.999).float().mean() < 0.01
    # eval leaves the stored spectral vectors alone
    assert torch.equal(gen.head_0.conv_0.weight_u, state["head_0.conv_0.weight_u"])


def test_encoder_checkpoints_round_trip_and_match_the_reference(tmp_path):
    g_state = random_state("coco_vae", "generator", seed=2)
    e_state = random_state("coco_vae", "encoder", seed=3)
    g = write_state(tmp_path / "latest_net_G.pth", g_state)
    e = write_state(tmp_path / "latest_net_E.pth", e_state)
    ckpt = convert_official("coco", g, encoder=e)
    assert ckpt.config.use_vae
    ckpt.save(tmp_path / "vae.pt")
    loaded = Checkpoint.load(tmp_path / "vae.pt")
    gen, enc = loaded.build_generator(), loaded.build_encoder()
    image = torch.rand(1, 3, 256, 256) * 2 - 1
    label = blocky_labels(loaded.config)
    seg = semantic_input(label, loaded.config, label)
    with torch.no_grad():
        mu, _ = enc(image)
        ours = gen(seg, mu)
    ref_mu, _ = ref.encoder(e_state, image)
    expected = ref.generator(g_state, seg, latent=(8, 8), more=False, z=ref_mu)
    assert (ours - expected).abs().max().item() <= 1e-4


def test_loading_does_not_draw_random_weights_or_move_the_global_rng():
    """Networks are built on the meta device and filled from the state: no initialisation to pay for, and
    loading a model leaves torch's global random stream where it was (the generator side, the folded
    inference generator, the encoder and the discriminator)."""
    from spade.synthesize import Synthesizer

    cfg = ModelConfig.from_preset("coco", use_vae=True, ngf=8, ndf=8, crop_size=64)
    torch.manual_seed(5)
    states = {name: NETWORKS[name].from_config(cfg).state_dict() for name in ("generator", "encoder", "discriminator")}
    ckpt = Checkpoint(config=cfg, **states)

    def draws_after(load) -> torch.Tensor:  # noqa: ANN001
        torch.manual_seed(0)
        load()
        return torch.rand(4)

    untouched = draws_after(lambda: None)
    for name in ("generator", "encoder", "discriminator"):
        net = ckpt.build(name)
        assert torch.equal(draws_after(lambda n=name: ckpt.build(n)), untouched), name
        state = net.state_dict()
        assert all(not t.is_meta and torch.equal(t, states[name][k]) for k, t in state.items()), name
    assert torch.equal(draws_after(lambda: Synthesizer(ckpt, precision="float32")), untouched)


def test_loading_a_model_does_not_import_the_compiler_stack(tmp_path):
    """Building on the meta device must not draw random numbers there: torch's reference ops would import
    torch._dynamo (most of a second at every serving worker's start) for values the state replaces."""
    from spade.nn import SPADEGenerator

    cfg = ModelConfig.from_preset("coco", use_vae=True, ngf=8, crop_size=64)
    path = Checkpoint(config=cfg, generator=SPADEGenerator.from_config(cfg).state_dict()).save(tmp_path / "m.pt")
    code = (
        "import sys; from spade.synthesize import Synthesizer; before = 'torch._dynamo' in sys.modules; "
        "[Synthesizer.from_file(sys.argv[1], precision=p, fast=f) for p in ('float32', 'bfloat16') for f in (0, 1)]; "
        "print(before, 'torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    before, after = out.split()
    assert after == before, "loading a checkpoint imported torch._dynamo"


def test_discriminator_is_kept_for_fine_tuning(tmp_path):
    g = write_state(tmp_path / "G.pth", random_state("ade20k", "generator"))
    d = write_state(tmp_path / "D.pth", random_state("ade20k", "discriminator"))
    ckpt = convert_official("ade20k", g, discriminator=d)
    net = ckpt.build("discriminator")
    assert net is not None and len(list(net.children())) == 2


def test_dataparallel_prefix_is_accepted(tmp_path):
    state = {f"module.{k}": v for k, v in random_state("cityscapes", "generator").items()}
    ckpt = convert_official("cityscapes", write_state(tmp_path / "G.pth", state))
    assert "fc.weight" in ckpt.generator


def test_checkpoint_of_another_preset_is_named(tmp_path):
    src = write_state(tmp_path / "latest_net_G.pth", random_state("ade20k", "generator"))
    with pytest.raises(SpadeError, match=r"is a ade20k generator, not coco: run again with --preset ade20k"):
        convert_official("coco", src)


def test_encoder_generator_without_encoder_file_is_explained(tmp_path):
    src = write_state(tmp_path / "G.pth", random_state("coco_vae", "generator"))
    with pytest.raises(SpadeError, match="trained with the image encoder: pass its latest_net_E.pth with --encoder"):
        convert_official("coco", src)


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path):
    state = random_state("coco", "generator")
    del state["up_3.conv_s.weight_orig"]
    state["extra.weight"] = torch.zeros(3)
    state["conv_img.weight"] = torch.zeros(3, 32, 3, 3)
    src = write_state(tmp_path / "G.pth", state)
    with pytest.raises(SpadeError) as err:
        convert_official("coco", src)
    msg = str(err.value)
    assert "1 missing key(s): up_3.conv_s.weight_orig" in msg
    assert "1 unexpected key(s): extra.weight" in msg
    assert "1 mis-shaped key(s): conv_img.weight: file (3, 32, 3, 3) vs model (3, 64, 3, 3)" in msg
    assert str(src) in msg


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(SpadeError, match="generator file not found: .*nope.pth"):
        convert_official("coco", tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(SpadeError, match="junk.pth: cannot load generator state dict"):
        convert_official("coco", junk)
    with pytest.raises(SpadeError, match="official checkpoints exist for coco, ade20k, cityscapes"):
        convert_official("custom", junk)


def test_bare_state_dict_is_not_taken_for_a_project_checkpoint(tmp_path):
    src = write_state(tmp_path / "latest_net_G.pth", {"fc.weight": torch.zeros(1)})
    with pytest.raises(SpadeError, match="bare state dict .* spade convert-official"):
        Checkpoint.load(src)
    with pytest.raises(SpadeError, match="checkpoint not found"):
        Checkpoint.load(tmp_path / "absent.pt")


def test_checkpoints_load_with_weights_only_and_saves_are_atomic(tmp_path):
    cfg = ModelConfig.from_preset("custom", ngf=4, crop_size=64)
    from spade.nn import SPADEGenerator

    ckpt = Checkpoint(config=cfg, generator=SPADEGenerator.from_config(cfg).state_dict())
    path = ckpt.save(tmp_path / "c.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "spade-checkpoint" and raw["config"]["ngf"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp files left behind
    first = path.read_bytes()

    class Boom(Exception):
        pass

    def exploding_save(*args, **kwargs):
        raise Boom

    import spade.checkpoints as module

    original = module.torch.save
    module.torch.save = exploding_save
    try:
        with pytest.raises(Boom):
            ckpt.save(path)
    finally:
        module.torch.save = original
    assert path.read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
