import pytest
import torch
from torch import nn

import reference_forward as ref
from official_states import random_state
from spade.checkpoints import expected_shapes
from spade.config import ModelConfig
from spade.labels import semantic_input
from spade.nn import ConvEncoder, MultiscaleDiscriminator, SPADEGenerator, SpectralNormConv2d, reparameterize

# Parameter counts from the reference facts, in millions (generator, discriminator).
PAPER_COUNTS = {"coco": (97.5, 5.9), "ade20k": (96.5, 5.8), "cityscapes": (93.0, 5.6)}
NETS = {"generator": SPADEGenerator, "discriminator": MultiscaleDiscriminator, "encoder": ConvEncoder}


def official_config(name: str) -> ModelConfig:
    return ModelConfig.from_preset(name.removesuffix("_vae"), use_vae=name.endswith("_vae"))


def meta_net(network: str, cfg: ModelConfig) -> nn.Module:
    with torch.device("meta"):
        return NETS[network].from_config(cfg)


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", ["coco", "ade20k", "cityscapes", "coco_vae"])
def test_every_spec_key_maps_with_its_shape(name, spec):
    cfg = official_config(name)
    for network in ("generator", "discriminator", "encoder"):
        if network not in spec[name]:
            continue
        expected = {k: tuple(v) for k, v in spec[name][network].items()}
        assert expected_shapes(network, cfg) == expected, f"{name} {network}"


@pytest.mark.parametrize("name", ["coco", "ade20k", "cityscapes"])
def test_parameter_counts_match_the_paper_and_spec(name, spec):
    cfg = official_config(name)
    g_millions, d_millions = PAPER_COUNTS[name]
    for network, millions in (("generator", g_millions), ("discriminator", d_millions)):
        count = n_params(meta_net(network, cfg))
        assert round(count / 1e6, 1) == millions
        spec_count = sum(
            torch.Size(shape).numel()
            for key, shape in spec[name][network].items()
            if not key.endswith(("weight_u", "weight_v", "running_mean", "running_var", "num_batches_tracked"))
        )
        assert count == spec_count


@pytest.mark.parametrize("preset", ["coco", "ade20k", "cityscapes", "custom"])
@pytest.mark.parametrize("upsampling", ["normal", "more", "most"])
def test_generator_and_encoder_shapes_for_every_preset_and_variant(preset, upsampling):
    cfg = ModelConfig.from_preset(preset, ngf=4, ndf=4, num_upsampling_layers=upsampling, use_vae=True)
    h, w = cfg.output_size
    assert (h, w) == (round(cfg.crop_size / cfg.aspect_ratio), cfg.crop_size)
    label = torch.randint(0, cfg.label_nc, (2, 1, h, w))
    seg = semantic_input(label, cfg, label if cfg.use_instance else None)
    assert seg.shape == (2, cfg.semantic_nc, h, w)
    gen = SPADEGenerator.from_config(cfg).eval()
    enc = ConvEncoder.from_config(cfg).eval()
    with torch.no_grad():
        mu, logvar = enc(torch.rand(2, 3, h, w) * 2 - 1)
        assert mu.shape == logvar.shape == (2, cfg.z_dim)
        image = gen(seg, reparameterize(mu, logvar))
    assert image.shape == (2, 3, h, w)
    assert image.abs().max() <= 1
    assert hasattr(gen, "up_4") == (upsampling == "most")
    assert gen.output_size == (h, w)


def test_label_map_generator_without_encoder_is_deterministic():
    cfg = ModelConfig.from_preset("custom", ngf=4, crop_size=64)
    gen = SPADEGenerator.from_config(cfg).eval()
    label = torch.randint(0, cfg.label_nc + 1, (1, 1, 64, 64))
    seg = semantic_input(label, cfg)
    outputs = []
    with torch.no_grad():
        for seed in (1, 2):  # a generator that drew noise of its own would see two different RNG states
            torch.manual_seed(seed)
            outputs.append(gen(seg))
            after = torch.get_rng_state()
            torch.manual_seed(seed)
            assert torch.equal(after, torch.get_rng_state())  # and it drew none
    assert torch.equal(outputs[0], outputs[1])
    # determined by the label map, not constant: another map gives another image
    other = semantic_input(torch.randint(0, cfg.label_nc + 1, (1, 1, 64, 64)), cfg)
    with torch.no_grad():
        assert (gen(other) - outputs[0]).abs().mean() > 1e-3


def test_discriminator_returns_features_per_scale():
    cfg = ModelConfig.from_preset("coco", ndf=8, num_D=3, n_layers_D=4)
    d = MultiscaleDiscriminator.from_config(cfg)
    out = d(torch.randn(2, cfg.semantic_nc + 3, 64, 64))
    assert len(out) == 3
    assert [len(scale) for scale in out] == [5, 5, 5]
    assert out[0][0].shape == (2, 8, 33, 33)
    assert out[0][-1].shape[1] == 1
    # the second scale sees the input average-pooled by 2
    assert out[1][0].shape[-1] < out[0][0].shape[-1]


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_discriminator_norm_choices(norm):
    cfg = ModelConfig.from_preset("custom", ndf=4, norm_D=norm, spectral_D=False)
    d = MultiscaleDiscriminator.from_config(cfg)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert not any(isinstance(m, SpectralNormConv2d) for m in convs)
    assert any(isinstance(m, nn.InstanceNorm2d) for m in d.modules()) == (norm == "instance")
    assert d(torch.randn(2, cfg.semantic_nc + 3, 32, 32))[0][-1].shape[0] == 2


@pytest.mark.parametrize(
    "kind, cls", [("instance", nn.InstanceNorm2d), ("batch", nn.BatchNorm2d), ("syncbatch", nn.BatchNorm2d)]
)
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_spade_norm_and_kernel_choices(kind, cls, kernel):
    cfg = ModelConfig.from_preset("custom", ngf=4, crop_size=64, spade_norm=kind, spade_kernel=kernel, spectral_G=False)
    gen = SPADEGenerator.from_config(cfg)
    norms = [m.param_free_norm for m in gen.modules() if hasattr(m, "param_free_norm")]
    assert norms and all(type(n) is cls and not n.affine for n in norms)
    assert gen.head_0.norm_0.mlp_gamma.kernel_size == (kernel, kernel)
    assert not any(isinstance(m, SpectralNormConv2d) for m in gen.modules())
    assert gen(semantic_input(torch.zeros(2, 1, 64, 64, dtype=torch.long), cfg)).shape == (2, 3, 64, 64)


def test_spectral_norm_matches_the_largest_singular_value_and_freezes_in_eval():
    torch.manual_seed(0)
    conv = SpectralNormConv2d(8, 16, 3, padding=1)
    conv.train()
    for _ in range(50):
        conv(torch.randn(1, 8, 5, 5))
    w = conv.normalized_weight().detach()
    assert torch.linalg.matrix_norm(w.flatten(1), ord=2).item() == pytest.approx(1.0, abs=1e-3)
    conv.eval()
    u = conv.weight_u.clone()
    conv(torch.randn(1, 8, 5, 5))
    assert torch.equal(u, conv.weight_u)
    # eval uses exactly the stored vectors: sigma = u . (W v)
    w_mat = conv.weight_orig.flatten(1)
    sigma = torch.dot(conv.weight_u, w_mat @ conv.weight_v)
    assert torch.allclose(conv.normalized_weight(), conv.weight_orig / sigma)


def test_spectral_norm_gradients_flow_to_weight_orig():
    conv = SpectralNormConv2d(4, 4, 3, padding=1).train()
    conv(torch.randn(2, 4, 6, 6)).square().sum().backward()
    assert conv.weight_orig.grad is not None and conv.weight_orig.grad.abs().sum() > 0


def test_converted_encoder_and_discriminator_match_the_reference_computation():
    enc_sd = random_state("coco_vae", "encoder", seed=3)
    enc = ConvEncoder.from_config(official_config("coco_vae"))
    enc.load_state_dict(enc_sd)
    image = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        mu, logvar = enc.eval()(image)
    ref_mu, ref_logvar = ref.encoder(enc_sd, image)
    assert (mu - ref_mu).abs().max() <= 1e-4 and (logvar - ref_logvar).abs().max() <= 1e-4

    d_sd = random_state("coco", "discriminator", seed=4)
    d = MultiscaleDiscriminator.from_config(official_config("coco"))
    d.load_state_dict(d_sd)
    x = torch.randn(1, 187, 128, 128)
    with torch.no_grad():
        ours = d.eval()(x)
    theirs = ref.discriminator(d_sd, x)
    for ours_scale, ref_scale in zip(ours, theirs, strict=True):
        for a, b in zip(ours_scale, ref_scale, strict=True):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_figure3_spade_keeps_semantics_that_a_conv_norm_block_washes_away(norm):
    """Figure 3: a uniform label map through a convolution and then the parameter-free norm SPADE uses
    (ours: spade_norm.param_free_norm; batch norm with the statistics of a batch of that one map) comes out
    as zeros whatever its label; our SPADE layer after the same convolution injects the label after
    normalising, so its output keeps the label. (The whole generator is no witness: its first layer and
    the residual shortcuts carry the label past every norm even with the modulation switched off.)"""
    from spade.nn.spade_norm import SPADE, param_free_norm

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("custom", ngf=8, crop_size=64, spade_norm=norm)
    uniform = {c: semantic_input(torch.full((1, 1, 64, 64), c), cfg) for c in (1, 5)}
    # replicate padding: the convolution of a constant map is exactly constant, borders included
    conv = nn.Conv2d(cfg.semantic_nc, 32, 3, padding=1, padding_mode="replicate")
    block_norm = param_free_norm(norm, 32).train()  # batch norm: the batch's own statistics, as in training
    spade = SPADE(32, cfg.semantic_nc, norm=norm, hidden=32).train()
    with torch.no_grad():
        features = {c: conv(seg) for c, seg in uniform.items()}
        assert (features[1] - features[5]).abs().max() > 1e-2  # the label is there before the norm ...
        for c, x in features.items():
            # ... and gone after it: zero up to the float32 rounding of the mean of n equal values, at most
            # n u |x| (u = 2^-24), which the norm divides by sqrt(var + eps) = sqrt(eps) (the variance is 0)
            n = x[0, 0].numel() * (x.shape[0] if norm == "batch" else 1)
            bound = n * 2.0**-24 * x.abs().max().item() / block_norm.eps**0.5
            assert block_norm(x).abs().max() <= bound, c
            assert bound < 0.1  # far below the unit scale a normalised map with the label left in would have
        spade_out = {c: spade(features[c], seg) for c, seg in uniform.items()}
    # SPADE injects the label after normalisation: different labels give different outputs, in the middle of
    # the map too (not a border artefact of the label convolutions' zero padding)
    difference = (spade_out[1] - spade_out[5]).abs()
    assert difference.mean() > 1e-2 and difference[..., 16:48, 16:48].mean() > 1e-2
