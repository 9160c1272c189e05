"""Segmenters: DeepLab-v2 (keys, preprocessing, multi-scale max, shapes), torchvision DeepLab-v3, the small
segmenter (trains to a stated accuracy, reloads), and load_segmenter's errors."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import shared_path
from spade.config import DataConfig
from spade.data.layouts import find_pairs
from spade.data.synthetic import CLASS_NAMES, generate_builtin_dataset
from spade.errors import SpadeError
from spade.evaluate.segmenters import SEGMENTERS, load_segmenter, looks_like
from spade.evaluate.segmenters import deeplabv2 as dl2
from spade.evaluate.segmenters.base import Segmentation
from spade.evaluate.segmenters.small import (
    FORMAT,
    SmallSegNet,
    pixel_accuracy,
    save_small_segmenter,
    train_small_segmenter,
)
from spade.evaluate.segmenters.torchvision_deeplabv3 import IMAGENET_MEAN, IMAGENET_STD, build_deeplabv3

KEYS_FILE = Path(__file__).parent / "fixtures" / "deeplabv2_resnet101_cocostuff164k_keys.json"
DEEPLAB_PARAMS = 55_919_384
# val pixel accuracy the short test schedule (48 scenes, 32 px, 150 iterations) must reach;
# measured 0.848 at seed 0 (0.795 and 0.833 at seeds 1 and 2)
SMALL_ACCURACY = 0.75


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These small CPU runs gain nothing from a second thread, and on a busy 2-core runner OpenMP's
    barriers can make them ten times slower; one thread keeps the module's runtime steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def deeplab_keys() -> dict[str, list[int]]:
    keys = json.loads(KEYS_FILE.read_text())
    shared = shared_path("spec", "deeplabv2_resnet101_cocostuff164k_keys.json")
    if shared is not None:  # the vendored copy must not drift from the project's spec
        assert json.loads(shared.read_text()) == keys
    return keys


def random_deeplab_state(keys: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """The checkpoint's keys and shapes with random values at sane scales (finite activations)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100_000)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("running_mean") or key.endswith("bias"):
            state[key] = torch.randn(shape, generator=g) * 0.05
        elif key.endswith("bn.weight"):
            state[key] = torch.rand(shape, generator=g) * 0.5 + 0.25
        else:
            state[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return state


@pytest.fixture(scope="module")
def deeplab_state(deeplab_keys) -> dict[str, torch.Tensor]:
    return random_deeplab_state(deeplab_keys)


@pytest.fixture(scope="module")
def deeplab_file(deeplab_state, tmp_path_factory) -> Iterator[Path]:
    """A 224 MB file like the real checkpoint, removed afterwards."""
    path = tmp_path_factory.mktemp("deeplab") / dl2.DEFAULT_FILE
    torch.save(deeplab_state, path)
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_deeplabv3("resnet50", 5, aux_loss=True)
    path = tmp_path_factory.mktemp("tv") / "deeplabv3_5.pth"
    torch.save(model.state_dict(), path)
    return path


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def check_result(result: Segmentation, h: int, w: int, num_classes: int) -> None:
    assert result.labels.shape == (h, w) and result.labels.dtype == np.int64
    assert result.confidence.shape == (h, w) and result.confidence.dtype == np.float32
    assert result.labels.min() >= 0 and result.labels.max() < num_classes
    assert np.all(result.confidence >= 1.0 / num_classes - 1e-6) and np.all(result.confidence <= 1.0 + 1e-6)


# --------------------------------------------------------------------------- DeepLab-v2: network and weights


def test_deeplabv2_has_exactly_the_checkpoint_keys_and_55_9m_parameters(deeplab_keys):
    model = dl2.DeepLabV2()
    state = model.state_dict()
    assert len(deeplab_keys) == 632
    assert list(state) == list(deeplab_keys)
    assert {k: list(v.shape) for k, v in state.items()} == deeplab_keys
    assert dl2.parameter_count(model) == DEEPLAB_PARAMS
    assert round(DEEPLAB_PARAMS / 1e6, 1) == 55.9
    bn = model.base.layer2.block1.reduce.bn
    assert bn.eps == 1e-5 and model.base.layer1.pool.ceil_mode
    assert model.base.layer3.block1.reduce.conv.stride == (2, 2)  # the stride sits on the first 1x1
    assert model.base.layer3.block1.conv3x3.conv.stride == (1, 1)
    assert model.base.layer4.block7.conv3x3.conv.dilation == (2, 2)
    assert model.base.layer5.block3.conv3x3.conv.dilation == (4, 4)
    assert [model.base.aspp.get_submodule(f"c{i}").dilation for i in range(4)] == [(d, d) for d in (6, 12, 18, 24)]
    model.train()
    assert not model.training and not bn.training  # always eval: frozen batch norm


def test_deeplabv2_output_stride_is_8():
    backbone = dl2.DeepLabV2Backbone(num_classes=3, blocks=(1, 1, 1, 1))
    with torch.inference_mode():
        assert backbone(torch.zeros(1, 3, 513, 385)).shape == (1, 3, 65, 49)


def test_deeplabv2_strict_load_of_the_checkpoint_layout(deeplab_state):
    seg = dl2.build_from_state(deeplab_state, source="random.pth")
    loaded = seg.model.state_dict()
    assert len(loaded) == 632
    for key in ("base.layer1.conv1.conv.weight", "base.layer4.block23.increase.bn.running_var", "base.aspp.c3.bias"):
        assert torch.equal(loaded[key], deeplab_state[key])
    assert seg.num_classes == 182
    assert seg.class_names[0] == "person" and seg.class_names[181] == "wood" and len(seg.class_names) == 182
    # a 'module.'-prefixed or nested file reads the same
    nested = {"state_dict": {f"module.{k}": v for k, v in deeplab_state.items()}}
    assert dl2.build_from_state(nested, source="nested.pth").num_classes == 182


def test_cocostuff_class_names_match_the_spec():
    names = dl2.cocostuff_class_names()
    assert len(names) == 182 and names[:3] == ["person", "bicycle", "car"] and names[-1] == "wood"
    spec = shared_path("spec", "cocostuff_labels.txt")
    if spec is not None:
        assert dl2.COCOSTUFF_LABELS.read_text() == spec.read_text()


def test_deeplabv2_through_load_segmenter_segments_at_the_photos_size(deeplab_file):
    seg = load_segmenter("deeplabv2-cocostuff", deeplab_file)
    assert seg.name == "deeplabv2-cocostuff" and seg.num_classes == 182
    assert seg.long_side == 513 and seg.model.scales == (1.0, 0.5, 0.75)
    # the one full-size ResNet-101 run: 65x49 -> 513x387 input at 3 scales
    (result,) = seg.segment([photo(49, 65)])
    check_result(result, 49, 65, 182)


def test_deeplabv2_labels_are_the_argmax_of_the_upsampled_logits(deeplab_state):
    seg = dl2.build_from_state(deeplab_state, source="random.pth", long_side=33)
    p = photo(25, 33)
    (logits,) = seg.logits([p])
    assert logits.shape == (182, 4, 5) and torch.isfinite(logits).all()  # 33x25 input at output stride 8
    (result,) = seg.segment([p])
    up = F.interpolate(logits[None], size=(25, 33), mode="bilinear", align_corners=False)[0]
    assert np.array_equal(result.labels, up.argmax(0).numpy())
    np.testing.assert_allclose(result.confidence, up.softmax(0).amax(0).numpy(), rtol=1e-5)


def test_deeplabv2_batches_photos_of_different_sizes(deeplab_state):
    seg = dl2.build_from_state(deeplab_state, source="random.pth", long_side=33, scales=(1.0, 0.5), batch_size=2)
    photos = [photo(33, 25, 1), photo(20, 30, 2), photo(33, 25, 3), photo(33, 25, 4)]
    results = seg.segment(photos)
    for p, r in zip(photos, results, strict=True):
        check_result(r, p.shape[0], p.shape[1], 182)
    alone = seg.segment([photos[2]])[0]  # batched or alone: the same answer (eval-mode batch norm)
    np.testing.assert_allclose(results[2].confidence, alone.confidence, rtol=1e-4, atol=1e-5)
    assert (results[2].labels == alone.labels).mean() > 0.99


# --------------------------------------------------------------------------- DeepLab-v2: preprocessing, multi-scale


def test_preprocess_bgr_minus_means_and_long_side_513():
    rgb = np.array(
        [
            [[10, 20, 30], [40, 50, 60], [70, 80, 90], [100, 110, 120]],
            [[0, 0, 0], [200, 100, 50], [100, 200, 250], [255, 255, 255]],
            [[5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15, 16]],
        ],
        dtype=np.uint8,
    )  # H=3, W=4
    x = dl2.preprocess(rgb)
    assert x.shape == (1, 3, 385, 513) and x.dtype == torch.float32  # 3 * 513 / 4 = 384.75 -> 385
    mean_bgr = np.array([104.008, 116.669, 122.675])
    # the top-left output pixel is the top-left photo pixel, channels reversed, means subtracted
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), np.array([30, 20, 10]) - mean_bgr, atol=1e-3)
    np.testing.assert_allclose(x[0, :, -1, -1].numpy(), np.array([16, 15, 14]) - mean_bgr, atol=1e-3)
    # output (192, 256) maps to source row 1.0, column 1.5: half of (1, 1) and half of (1, 2)
    expected = (np.array([50, 100, 200]) + np.array([250, 200, 100])) / 2 - mean_bgr
    np.testing.assert_allclose(x[0, :, 192, 256].numpy(), expected, atol=1e-3)


def test_preprocess_sizes_and_flat_colour():
    flat = np.zeros((7, 5, 3), np.uint8)
    flat[...] = (200, 150, 100)  # R, G, B
    x = dl2.preprocess(flat)
    assert x.shape == (1, 3, 513, round(5 * 513 / 7))  # the long side is the height here
    expected = torch.tensor([100 - 104.008, 150 - 116.669, 200 - 122.675]).view(3, 1, 1)  # B, G, R
    torch.testing.assert_close(x[0], expected.expand_as(x[0]), atol=1e-4, rtol=0)
    assert dl2.preprocess(photo(513, 300)).shape == (1, 3, 513, 300)  # already 513: unchanged
    assert dl2.preprocess(photo(640, 480)).shape == (1, 3, 513, 385)
    assert dl2.preprocess(photo(9, 6), long_side=None).shape == (1, 3, 9, 6)


def test_scale_pyramid_sizes():
    sizes = [tuple(x.shape[-2:]) for x in dl2.scale_pyramid(torch.zeros(1, 3, 513, 385))]
    assert sizes == [(513, 385), (256, 192), (384, 288)]


def test_combine_scales_is_a_pixelwise_max_over_all_scales_with_bilinear_resize():
    full = torch.tensor([[[[2.0, 2.0, 2.0, 2.0]], [[0.0, 9.0, 0.0, 0.0]]]])  # (1, 2, 1, 4): scale 1
    half = torch.tensor([[[[0.0, 4.0]], [[1.0, 1.0]]]])  # (1, 2, 1, 2): upsampled to [0, 1, 3, 4] and [1, 1, 1, 1]
    three_q = torch.full((1, 2, 1, 3), -5.0)
    three_q[0, 1, 0, :] = 7.0  # constant 7 after resizing
    out = dl2.combine_scales([full, half, three_q])
    assert out.shape == (1, 2, 1, 4)
    assert out[0, 0, 0].tolist() == [2.0, 2.0, 3.0, 4.0]  # scale 1 wins left, the half scale right
    assert out[0, 1, 0].tolist() == [7.0, 9.0, 7.0, 7.0]  # scale 1 wins where it is largest
    assert torch.equal(dl2.combine_scales([full]), full)


class _FakeBase(torch.nn.Module):
    """Logits at 1/8 of the input that grow with the input's width; records the sizes it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[-2:]))
        return F.avg_pool2d(x[:, :2], 8, ceil_mode=True) * x.shape[-1]


def test_deeplabv2_forward_runs_each_scale_and_takes_the_max():
    model = dl2.DeepLabV2(num_classes=2)
    model.base = _FakeBase()
    x = torch.rand(1, 3, 64, 48)
    out = model(x)
    assert model.base.seen == [(64, 48), (32, 24), (48, 36)]
    expected = dl2.combine_scales([_FakeBase()(xs) for xs in dl2.scale_pyramid(x)])
    assert out.shape == (1, 2, 8, 6) and torch.equal(out, expected)
    assert torch.equal(out, torch.maximum(expected, _FakeBase()(x)))  # the scale-1 logits take part in the max


# --------------------------------------------------------------------------- load_segmenter errors


def test_unknown_segmenter_lists_the_names(tmp_path):
    with pytest.raises(SpadeError) as err:
        load_segmenter("deeplab", tmp_path / "x.pth")
    for name in ("deeplabv2-cocostuff", "torchvision-deeplabv3", "small"):
        assert name in str(err.value)
    assert set(SEGMENTERS) == {"deeplabv2-cocostuff", "torchvision-deeplabv3", "small"}


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "no_such_deeplab.pth"
    with pytest.raises(SpadeError, match="no_such_deeplab.pth"):
        load_segmenter("deeplabv2-cocostuff", missing)


def test_unknown_option_is_refused(torchvision_file):
    with pytest.raises(SpadeError, match="long_side"):
        load_segmenter("torchvision-deeplabv3", torchvision_file, long_side=300)


def test_a_file_of_another_network_is_refused_with_its_keys(torchvision_file, tmp_path):
    with pytest.raises(SpadeError) as err:
        load_segmenter("deeplabv2-cocostuff", torchvision_file)
    message = str(err.value)
    assert str(torchvision_file) in message
    assert "632 missing key(s): base.layer1.conv1.conv.weight" in message and "more" in message
    assert "unexpected key(s): backbone.conv1.weight" in message
    assert "'torchvision-deeplabv3'" in message  # it says what the file looks like
    short = {
        "base.layer1.conv1.conv.weight": torch.zeros(64, 3, 7, 7),
        "base.aspp.c0.weight": torch.zeros(5, 2048, 3, 3),
    }
    torch.save(short, tmp_path / "short.pth")
    with pytest.raises(SpadeError, match="missing key"):
        load_segmenter("deeplabv2-cocostuff", tmp_path / "short.pth")
    with pytest.raises(SpadeError, match="5 classes, but num_classes=182"):
        load_segmenter("deeplabv2-cocostuff", tmp_path / "short.pth", num_classes=182)


def test_unreadable_and_non_dict_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(SpadeError, match="garbage.pth"):
        load_segmenter("small", garbage)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(SpadeError, match="list.pth"):
        load_segmenter("deeplabv2-cocostuff", listed)


def test_weights_from_an_s3_uri(monkeypatch, tmp_path):
    import moto

    for var in ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in {
        "AWS_ACCESS_KEY_ID": "t",
        "AWS_SECRET_ACCESS_KEY": "t",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(var, value)
    from spade.evaluate.segmenters.small import SmallSegmenterConfig
    from spade.storage import Store, s3_client

    local = save_small_segmenter(SmallSegNet(3, (4, 8)), SmallSegmenterConfig(3, widths=[4, 8]), tmp_path / "s.pt")
    with moto.mock_aws():
        s3_client().create_bucket(Bucket="models")
        Store("s3://models/segmenters").put(local, "s.pt")
        seg = load_segmenter("small", "s3://models/segmenters/s.pt")
        assert seg.num_classes == 3
        check_result(seg.segment([photo(20, 30)])[0], 20, 30, 3)
        with pytest.raises(SpadeError, match="s3://models/segmenters/nope.pt"):
            load_segmenter("small", "s3://models/segmenters/nope.pt")


# --------------------------------------------------------------------------- torchvision DeepLab-v3


def test_torchvision_deeplabv3_from_a_5_class_file(torchvision_file, tmp_path):
    seg = load_segmenter("torchvision-deeplabv3", torchvision_file, class_names=list("abcde"))
    assert seg.name == "torchvision-deeplabv3" and seg.num_classes == 5 and seg.class_names == list("abcde")
    assert seg.model.aux_classifier is not None  # inferred from the file's keys
    photos = [photo(40, 30, 1), photo(28, 36, 2)]
    results = seg.segment(photos)
    for p, r in zip(photos, results, strict=True):
        check_result(r, p.shape[0], p.shape[1], 5)
    # the same as torchvision's own forward on the ImageNet-normalised photo (which upsamples bilinearly too)
    x = torch.from_numpy(photos[0]).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.inference_mode():
        expected = seg.model(x)["out"][0]
    assert (results[0].labels == expected.argmax(0).numpy()).mean() > 0.999
    np.testing.assert_allclose(results[0].confidence, expected.softmax(0).amax(0).numpy(), rtol=1e-4, atol=1e-5)

    resized = load_segmenter("torchvision-deeplabv3", torchvision_file, short_side=24, num_classes=5)
    check_result(resized.segment([photos[1]])[0], 28, 36, 5)
    with pytest.raises(SpadeError, match="5 classes"):
        load_segmenter("torchvision-deeplabv3", torchvision_file, num_classes=21)
    with pytest.raises(SpadeError, match="3 class names"):
        load_segmenter("torchvision-deeplabv3", torchvision_file, class_names=["a", "b", "c"])
    names = tmp_path / "names.txt"
    names.write_text("".join(f"{i}\tc{i}\n" for i in range(5)))
    assert load_segmenter("torchvision-deeplabv3", torchvision_file, class_names=names).class_names[4] == "c4"


def test_torchvision_without_aux_head_and_resnet101_are_recognised(tmp_path):
    state = build_deeplabv3("resnet50", 2).state_dict()
    torch.save(state, tmp_path / "noaux.pth")
    seg = load_segmenter("torchvision-deeplabv3", tmp_path / "noaux.pth")
    assert seg.model.aux_classifier is None and seg.num_classes == 2
    state101 = build_deeplabv3("resnet101", 2).state_dict()
    assert looks_like(state101) == "torchvision-deeplabv3"
    from spade.evaluate.segmenters.torchvision_deeplabv3 import infer_arch

    assert infer_arch(state101) == "resnet101" and infer_arch(state) == "resnet50"


def test_photos_must_be_rgb_uint8(torchvision_file):
    seg = load_segmenter("torchvision-deeplabv3", torchvision_file)
    with pytest.raises(SpadeError, match="photo 1"):
        seg.segment([photo(8, 8), np.zeros((8, 8), np.uint8)])
    with pytest.raises(SpadeError, match="list of photos"):
        seg.segment(photo(8, 8))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- small segmenter


@pytest.fixture(scope="module")
def landscapes_32(tmp_path_factory) -> Path:
    return generate_builtin_dataset(
        tmp_path_factory.mktemp("landscapes") / "data", count=48, val_count=12, size=32, progress=False
    )


@pytest.fixture(scope="module")
def small_file(landscapes_32, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small")
    return train_small_segmenter(landscapes_32, out, size=32, iterations=150, batch_size=16, seed=0, progress=False)


def test_small_segmenter_is_small():
    assert sum(p.numel() for p in SmallSegNet(8).parameters()) < 1_000_000


def test_small_segmenter_trains_to_good_accuracy_and_reloads(landscapes_32, small_file):
    assert small_file.name == "small_segmenter.pt"
    payload = torch.load(small_file, map_location="cpu", weights_only=True)
    assert payload["format"] == FORMAT and payload["version"] == 1
    assert payload["config"]["class_names"] == list(CLASS_NAMES) and payload["config"]["input_size"] == 32
    seg = load_segmenter("small", small_file)
    assert seg.name == "small" and seg.num_classes == 8 and seg.class_names == list(CLASS_NAMES)
    val = find_pairs(DataConfig(layout="custom", root=str(landscapes_32), split="val"))
    accuracy = pixel_accuracy(seg, val, 8)
    assert accuracy > SMALL_ACCURACY
    assert accuracy == pytest.approx(payload["metrics"]["val_pixel_accuracy"], abs=1e-6)
    # any photo size: segmented at the working size, answered at the photo's size
    check_result(seg.segment([photo(50, 70)])[0], 50, 70, 8)
    # bf16 autocast (an option, off by default) gives nearly the same labels
    fast = load_segmenter("small", small_file, bf16=True)
    photos = [np.asarray(Image.open(s.image).convert("RGB")) for s in val[:4]]
    agree = [(a.labels == b.labels).mean() for a, b in zip(seg.segment(photos), fast.segment(photos), strict=True)]
    assert min(agree) > 0.95


def test_small_segmenter_file_errors(small_file, tmp_path):
    with pytest.raises(SpadeError, match="4 was asked|num_classes=4"):
        load_segmenter("small", small_file, num_classes=4)
    with pytest.raises(SpadeError, match="not a small segmenter file"):
        torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
        load_segmenter("small", tmp_path / "other.pt")
    with pytest.raises(SpadeError, match="'small'"):  # a small file given to DeepLab-v2 says what it is
        load_segmenter("deeplabv2-cocostuff", small_file)
