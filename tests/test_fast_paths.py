"""The fast inference paths agree with the reference float32 eager generator, on every preset.

float32 folded/fused, the bound and why: both paths evaluate the same function in float32, and each
output is the end of a chain of convolutions whose sums run over K = C_in * k * k terms (up to
1024 * 9 here) of values of every magnitude. Float32 rounding error of such a sum grows with K and with
sum |w x| (Higham: at most K u sum|w x|, typically sqrt(K) u sum|w x|, u = 2^-24), and the kernels'
blocking and vector width decide how: the same eager generator is 3e-6 from the exact answer (the
generator run in float64) with AVX-512 kernels and 1.1e-5 with AVX2 ones. So the bound is not a
constant: it is the float32 eager generator's own error, measured in the same run on the same CPU and
inputs (the rounding level of this network on these kernels), times FOLD_SLACK = 4. Folding keeps every
sum's length (or shortens it: the one-hot table lookup, the folded 1x1 shortcut) and adds one rounding
per folded weight (the norm's scale multiplied in); measured, the folded error is 0.5x to 1.9x the eager
one on both kinds of CPU, so 4 leaves room without letting a real mistake through (checked: folding
with the norm's eps taken 1.5x fails it). The floor, 16 ulps of 1.0, is where no two float32 programs
can be asked to agree on an image in [-1, 1]. bfloat16: PSNR >= 30 dB against float32 eager. Weights are
PyTorch's default initialisation with batch-norm statistics measured on label maps, so images use the
whole [-1, 1] range and the bounds mean something.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spade.nn.inference as fast
from spade.checkpoints import Checkpoint
from spade.config import ModelConfig
from spade.labels import class_ids_and_edges, semantic_input
from spade.nn import SPADEGenerator
from spade.nn.inference import InferenceGenerator, LabelPlan, OneHotConv
from spade.synthesize import Synthesizer

FOLD_SLACK = 4  # folded float32 error <= this x the eager float32 error (see the module docstring)
FLOAT32_FLOOR = 16 * 2.0**-23  # 16 ulps of 1.0


def float32_bound(eager_error: float) -> float:
    """The largest error from the exact answer allowed for a float32 fast path, from the eager one's."""
    return FOLD_SLACK * max(eager_error, FLOAT32_FLOOR)


# each preset's classes, don't-care, instance edges, resolution and upsampling; ngf 16 (a quarter of the
# width) keeps the suite quick: benchmarks/synthesis.py compares the full-width coco generator too
CONFIGS = {
    "coco": dict(preset="coco", ngf=16),
    "ade20k": dict(preset="ade20k", ngf=16),
    "cityscapes": dict(preset="cityscapes", ngf=16),
    "coco_vae": dict(preset="coco", use_vae=True, ngf=16),
    # instance norm (not foldable: kept at run time), 5x5 SPADE kernels, the "most" upsampling
    "custom_instance_k5_most": dict(
        preset="custom",
        label_nc=6,
        contain_dontcare_label=False,
        use_instance=True,
        crop_size=256,
        num_upsampling_layers="most",
        ngf=16,
        spade_norm="instance",
        spade_kernel=5,
    ),
    "custom_k1": dict(
        preset="custom",
        label_nc=5,
        contain_dontcare_label=True,
        use_instance=False,
        crop_size=64,
        ngf=8,
        spade_kernel=1,
    ),
}


def region_labels(cfg: ModelConfig, n: int, seed: int, regions: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Label maps made of Voronoi regions (like real segmentations) and instance maps splitting them further."""
    gen = torch.Generator().manual_seed(seed)
    h, w = cfg.output_size
    nc = cfg.onehot_nc
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    labels, instances = [], []
    for _ in range(n):
        pts = torch.rand(regions, 2, generator=gen) * torch.tensor([h, w])
        nearest = ((ys - pts[:, :1, None]) ** 2 + (xs - pts[:, 1:, None]) ** 2).argmin(0)
        classes = torch.randint(0, nc, (regions,), generator=gen)
        labels.append(classes[nearest])
        instances.append(nearest * (torch.rand(regions, generator=gen) < 0.5)[nearest])
    return torch.stack(labels).unsqueeze(1), torch.stack(instances).unsqueeze(1)


def measured_generator(cfg: ModelConfig) -> SPADEGenerator:
    """A generator with default-initialised weights and batch-norm statistics measured on label maps."""
    torch.manual_seed(0)
    g = SPADEGenerator.from_config(cfg)
    for m in g.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the running statistics become the measured ones
    g.train()
    with torch.no_grad():
        label, instance = region_labels(cfg, 2, seed=100)
        z = torch.randn(2, cfg.z_dim) if cfg.use_vae else None
        g(semantic_input(label, cfg, instance if cfg.use_instance else None), z)
    return g.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    cfg = ModelConfig.from_preset(**CONFIGS[request.param])
    g = measured_generator(cfg)
    n = 2 if request.param == "coco" else 1  # one batch of two checks the per-sample indexing
    label, instance = region_labels(cfg, n, seed=1)
    instance = instance if cfg.use_instance else None
    z = torch.randn(n, cfg.z_dim, generator=torch.Generator().manual_seed(3)) if cfg.use_vae else None
    seg = semantic_input(label, cfg, instance)
    with torch.inference_mode():
        reference = g(seg, z)
        exact = copy.deepcopy(g).double()(seg.double(), None if z is None else z.double())
    # the bounds below are only meaningful on images that use the range
    assert reference.std() > 0.2 and (reference.abs() > 0.99).float().mean() < 0.5
    return cfg, g, label, instance, z, reference, exact


def run_fast(cfg, g, label, instance, z, dtype):
    folded = InferenceGenerator.from_generator(g, n_onehot=cfg.onehot_nc, use_edge=cfg.use_instance, dtype=dtype)
    ids, edge = class_ids_and_edges(label, cfg, instance)
    return folded(ids, edge, z)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (((a - b) * 127.5) ** 2).mean().item()
    return 10 * np.log10(255**2 / max(mse, 1e-12))


@pytest.mark.parametrize("branch", ["gathered", "dense"])
def test_float32_folded_generator_matches_the_eager_one(case, branch, monkeypatch):
    cfg, g, label, instance, z, reference, exact = case
    # gathered: the modulation convolution runs only near boundaries; dense: everywhere
    monkeypatch.setattr(fast, "FORCE_GATHER", branch == "gathered")
    out = run_fast(cfg, g, label, instance, z, torch.float32)
    assert out.shape == reference.shape and out.dtype == torch.float32
    eager_error = (reference.double() - exact).abs().max().item()
    assert eager_error <= 1e-4  # the exactness the README claims, so the bound below cannot run away
    bound = float32_bound(eager_error)
    error = (out.double() - exact).abs().max().item()
    assert error <= bound, f"folded float32 is {error:.3g} from float64; eager float32 is {eager_error:.3g}"
    # and so, by the triangle inequality, from the eager float32 output
    assert (out.double() - reference.double()).abs().max().item() <= bound + eager_error


def test_bfloat16_fast_path_is_within_30_db_of_float32(case):
    cfg, g, label, instance, z, reference, _ = case
    out = run_fast(cfg, g, label, instance, z, torch.bfloat16)
    assert psnr(out, reference) >= 30


def test_folding_leaves_the_generator_and_its_checkpoint_untouched():
    cfg = ModelConfig.from_preset(**CONFIGS["custom_k1"])
    g = measured_generator(cfg)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    InferenceGenerator.from_generator(g, n_onehot=cfg.label_nc + 1, use_edge=False, dtype=torch.bfloat16)
    after = g.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not g.training  # from_generator does not change the source's mode
    # the Synthesizer folds the same checkpoint at load time: same numbers as folding by hand
    synth = Synthesizer(Checkpoint(config=cfg, generator=before), precision="float32")
    assert isinstance(synth.generator, InferenceGenerator)
    label, _ = region_labels(cfg, 1, seed=5)
    by_hand = run_fast(cfg, g, label, None, None, torch.float32)
    assert torch.equal(synth.synthesize(label), by_hand)
    eager = Synthesizer(Checkpoint(config=cfg, generator=before), precision="float32", fast=False)
    assert isinstance(eager.generator, SPADEGenerator)
    with torch.inference_mode():
        exact = copy.deepcopy(g).double()(semantic_input(label, cfg).double())
    eager_error = (eager.synthesize(label).double() - exact).abs().max().item()
    assert (by_hand.double() - exact).abs().max().item() <= float32_bound(eager_error)


def test_label_map_is_resized_once_per_resolution(monkeypatch):
    cfg = ModelConfig.from_preset("coco", ngf=8)
    g = measured_generator(cfg)
    folded = InferenceGenerator.from_generator(g, n_onehot=183, use_edge=True)
    resized = []
    real_interpolate = F.interpolate

    def counting(x, *args, **kwargs):
        if x.dtype == torch.float32 and x.shape[1] == 1:  # the joint label map (features are wider)
            resized.append(tuple(kwargs["size"]))
        return real_interpolate(x, *args, **kwargs)

    monkeypatch.setattr(fast.F, "interpolate", counting)
    label, instance = region_labels(cfg, 1, seed=2)
    folded(*class_ids_and_edges(label, cfg, instance))
    # 8x8 (first layer and head_0), 16, 32, 64, 128; 256 is the input's own size
    assert resized == [(8, 8), (16, 16), (32, 32), (64, 64), (128, 128)]


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("edge", [False, True])
def test_one_hot_table_lookup_is_the_convolution(k, edge):
    torch.manual_seed(k)
    n_onehot = 7
    conv = torch.nn.Conv2d(n_onehot + int(edge), 11, k, padding=k // 2)
    ids = torch.randint(0, n_onehot, (2, 9, 13))
    edges = torch.randint(0, 2, (2, 9, 13)) if edge else None
    dense = F.one_hot(ids, n_onehot).permute(0, 3, 1, 2).float()
    if edge:
        dense = torch.cat([dense, edges.unsqueeze(1).float()], dim=1)
    lookup = OneHotConv.from_conv(conv, n_onehot=n_onehot, use_edge=edge, dtype=torch.float32)
    plan = LabelPlan(ids, edges, n_onehot=n_onehot, use_edge=edge)
    with torch.no_grad():
        # both sum the same K = C_in k k products and the bias in float32 (most are zeros of the one-hot
        # input), each within K u (sum |w x| + |b|) of the exact sum (Higham's bound, u = 2^-24)
        magnitude = F.conv2d(dense, conv.weight.abs(), conv.bias.abs(), padding=k // 2)
        bound = 2 * conv.weight[0].numel() * 2.0**-24 * magnitude
        assert ((lookup(plan.at((9, 13))) - conv(dense)).abs() <= bound).all()


def test_boundary_pixels_are_those_whose_window_is_not_one_class_inside_the_image():
    ids = torch.zeros(1, 9, 9, dtype=torch.long)
    ids[0, 4, 4] = 1
    level = LabelPlan(ids, None, n_onehot=2, use_edge=False).at((9, 9))
    near = torch.zeros(9, 9, dtype=torch.bool)
    near[2:7, 2:7] = True  # within 2 pixels of the odd one out
    near[:2], near[-2:], near[:, :2], near[:, -2:] = True, True, True, True  # the window leaves the image
    assert torch.equal(level.boundary(2), near.flatten().nonzero().squeeze(1))
    assert level.boundary(0).numel() == 0
