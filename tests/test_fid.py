"""FID against pytorch-fid itself, on a random-weight copy of its Inception network (nothing downloaded).

The weights file has the real file's name, keys and shapes; pytorch-fid's `fid_inception_v3` is
made to build its own network and then load that file instead of fetching the published one.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

# pytorch-fid is a dev dependency: the reference these tests compare against (never skipped)
import pytorch_fid.fid_score as pytorch_fid_score  # noqa: E402
import pytorch_fid.inception as pytorch_fid_inception  # noqa: E402
import torch
from PIL import Image

from spade.errors import SpadeError
from spade.evaluate import fid as fid_module
from spade.evaluate.fid import (
    FIDAccumulator,
    activation_statistics,
    fid_from_folders,
    folder_statistics,
    frechet_distance,
    generated_to_unit,
    image_files,
)
from spade.evaluate.inception import WEIGHTS_NAME, FIDInceptionV3, load_fid_inception

N_IMAGES = 10
BATCH = 5


def random_fid_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """pytorch-fid's own FID Inception network with random, well-scaled weights, built without a download."""
    built = []
    make_torchvision_inception = pytorch_fid_inception._inception_v3

    def capture(*args, **kwargs):
        built.append(make_torchvision_inception(*args, **kwargs))
        return built[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pytorch_fid_inception, "_inception_v3", capture)
        # fid_inception_v3 patches the FID blocks into the captured network, then "downloads" its own state
        mp.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: built[-1].state_dict())
        net = pytorch_fid_inception.fid_inception_v3()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):  # He init keeps activations O(1) through the 40-odd layers
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                module.bias.copy_(torch.randn(n, generator=g) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
    return net.state_dict()


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fid_weights") / WEIGHTS_NAME
    torch.save(random_fid_state(), path)
    return path


@pytest.fixture
def pytorch_fid_with(weights: Path, monkeypatch: pytest.MonkeyPatch):
    """pytorch-fid, its weights 'download' answered with our random file."""
    monkeypatch.setattr(
        pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: torch.load(weights, weights_only=True)
    )
    return pytorch_fid_score


def scene(rng: np.random.Generator, size: tuple[int, int] = (64, 64), brightness: float = 0.0) -> np.ndarray:
    """A structured picture: a colour gradient with a few coloured rectangles, plus mild noise."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
    img = c0 + (c1 - c0) * (t - t.min()) / (np.ptp(t) + 1e-9)
    for _ in range(3):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        img[y : y + rng.integers(4, h // 2), x : x + rng.integers(4, w // 2)] = rng.uniform(0, 255, 3)
    img = img + rng.normal(0, 8, img.shape) + brightness
    return np.clip(img, 0, 255).astype(np.uint8)


def write_folder(folder: Path, seed: int, n: int = N_IMAGES, brightness: float = 0.0, sizes=None) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        size = sizes[i % len(sizes)] if sizes else (64, 64)
        Image.fromarray(scene(rng, size, brightness)).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """a, b: two samples of one distribution; bright: b's pictures, much brighter."""
    root = tmp_path_factory.mktemp("fid_images")
    return {
        "a": write_folder(root / "a", seed=1),
        "b": write_folder(root / "b", seed=2),
        "bright": write_folder(root / "bright", seed=2, brightness=120.0),
        "small_a": write_folder(root / "small_a", seed=3, n=3),  # for tests about caching, not about values
        "small_b": write_folder(root / "small_b", seed=4, n=3),
    }


@pytest.fixture(scope="module")
def model(weights: Path) -> FIDInceptionV3:
    return load_fid_inception(weights)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fid_cache")


def ours(a: Path, b: Path, weights: Path, cache_dir: Path, method: str = "sqrtm") -> float:
    return fid_from_folders(a, b, weights=weights, batch_size=BATCH, cache_dir=cache_dir, progress=False, method=method)


@pytest.fixture(scope="module")
def fid_ab(weights: Path, folders, cache_dir: Path) -> float:
    """Our FID of the two samples, as pytorch-fid computes it (a 2048-d sqrtm: ~10 s on a small CPU)."""
    return ours(folders["a"], folders["b"], weights, cache_dir)


@pytest.fixture
def cheap_distance(monkeypatch: pytest.MonkeyPatch) -> list:
    """frechet_distance replaced by a record of its inputs, for tests about everything around it."""
    calls = []

    def record(mu1, sigma1, mu2, sigma2, **options):
        calls.append((mu1, sigma1, mu2, sigma2))
        return float(np.abs(mu1 - mu2).sum())

    monkeypatch.setattr(fid_module, "frechet_distance", record)
    return calls


def test_loads_the_fid_weights_file_strictly(weights: Path, model: FIDInceptionV3) -> None:
    reference = torch.load(weights, weights_only=True)
    ours_state = model.state_dict()
    assert ours_state.keys() == reference.keys()
    assert reference["fc.weight"].shape == (1008, 2048)
    for name, tensor in reference.items():
        assert torch.equal(ours_state[name], tensor), name
    assert model.weights_id is not None


def test_pool3_features_match_pytorch_fid(model: FIDInceptionV3, pytorch_fid_with, folders) -> None:
    theirs = pytorch_fid_with.InceptionV3([3]).eval()
    files = image_files(folders["a"])[:4]
    their_acts = pytorch_fid_with.get_activations(files, theirs, batch_size=4, device="cpu", num_workers=0)
    batch = torch.stack([fid_module.load_image(f) for f in files])
    with torch.no_grad():
        our_acts = model(batch).double().numpy()
    assert our_acts.shape == (4, 2048)
    assert our_acts.std() > 0.05  # the random network's features are neither dead nor constant
    np.testing.assert_allclose(our_acts, their_acts, rtol=1e-5, atol=1e-6)


def test_fid_matches_pytorch_fid(pytorch_fid_with, folders, fid_ab: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytorch-fid's sqrtm(disp=False) is deprecated in scipy >= 1.16
        theirs = pytorch_fid_with.calculate_fid_given_paths(
            [str(folders["a"]), str(folders["b"])], batch_size=BATCH, device="cpu", dims=2048, num_workers=0
        )
    assert isinstance(fid_ab, float)
    assert theirs > 0
    assert abs(fid_ab - theirs) <= 1e-3 * abs(theirs), (fid_ab, theirs)


def test_fid_of_a_set_with_itself_is_zero(weights: Path, folders, cache_dir: Path) -> None:
    # "eigh" (checked against "sqrtm" below) keeps the suite fast; the matching test above uses "sqrtm"
    assert abs(ours(folders["a"], folders["a"], weights, cache_dir, method="eigh")) < 1e-3


def test_shifted_distribution_is_much_further(weights: Path, folders, cache_dir: Path, fid_ab: float) -> None:
    shifted = ours(folders["a"], folders["bright"], weights, cache_dir, method="eigh")
    assert shifted > 2 * fid_ab > 0, (shifted, fid_ab)


def test_statistics_are_cached_and_reused(
    weights: Path,
    folders,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cheap_distance: list,
) -> None:
    forwards = []
    original = FIDInceptionV3.forward
    monkeypatch.setattr(FIDInceptionV3, "forward", lambda self, x: forwards.append(len(x)) or original(self, x))
    a, b = folders["small_a"], folders["small_b"]
    first = ours(a, b, weights, tmp_path)
    assert sum(forwards) == 6
    assert len(list(tmp_path.glob("fid-*.npz"))) == 2

    def no_network(*args, **kwargs):
        raise AssertionError("the network was loaded although both folders are cached")

    monkeypatch.setattr(fid_module, "load_fid_inception", no_network)
    assert ours(a, b, weights, tmp_path) == first
    assert sum(forwards) == 6
    for before, again in zip(cheap_distance[0], cheap_distance[1], strict=True):
        np.testing.assert_array_equal(before, again)

    # a copy of a folder (same content) hits the cache too; changing one image misses it
    copy = shutil.copytree(b, tmp_path / "b_copy")
    assert ours(a, copy, weights, tmp_path) == first
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(copy / "000.png")
    with pytest.raises(AssertionError, match="network was loaded"):
        ours(a, copy, weights, tmp_path)


def test_spade_fid_call_caches_under_spade_cache_dir(
    weights: Path,
    folders,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cheap_distance: list,
) -> None:
    monkeypatch.setenv("SPADE_CACHE_DIR", str(tmp_path))
    value = fid_from_folders(str(folders["small_a"]), str(folders["small_b"]), weights=str(weights), progress=False)
    assert isinstance(value, float) and value > 0
    assert len(list((tmp_path / "fid_stats").glob("fid-*.npz"))) == 2


def test_npz_statistics_stand_in_for_a_folder(
    weights: Path,
    folders,
    cache_dir: Path,
    tmp_path: Path,
    cheap_distance: list,
) -> None:
    mu, sigma = folder_statistics(folders["b"], weights=weights, cache_dir=cache_dir, progress=False)
    np.savez(tmp_path / "b.npz", mu=mu, sigma=sigma)
    ours(folders["a"], tmp_path / "b.npz", weights, cache_dir)
    ours(tmp_path / "b.npz", tmp_path / "b.npz", tmp_path / "no weights needed", cache_dir)
    np.testing.assert_array_equal(cheap_distance[0][2], mu)
    np.testing.assert_array_equal(cheap_distance[0][3], sigma)
    np.testing.assert_array_equal(cheap_distance[1][0], mu)


def test_missing_weights_error_names_the_file(folders, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SpadeError, match=WEIGHTS_NAME):
        fid_from_folders(folders["a"], folders["b"], weights=tmp_path, cache_dir=tmp_path, progress=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SpadeError, match=f"{WEIGHTS_NAME}.*torch hub cache") as info:
        load_fid_inception()
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in str(info.value)


def test_weights_from_the_torch_hub_cache(weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / WEIGHTS_NAME).symlink_to(weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert load_fid_inception().weights_id == load_fid_inception(weights).weights_id


def test_a_file_of_other_weights_is_refused(tmp_path: Path) -> None:
    path = tmp_path / WEIGHTS_NAME
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, path)
    with pytest.raises(SpadeError, match="not the FID Inception"):
        load_fid_inception(path)


def test_mixed_sizes_in_one_batch_match_pytorch_fid_one_by_one(
    model: FIDInceptionV3, pytorch_fid_with, tmp_path: Path
) -> None:
    folder = write_folder(tmp_path / "mixed", seed=5, n=4, sizes=[(64, 64), (80, 48), (299, 299), (33, 70)])
    theirs = pytorch_fid_with.InceptionV3([3]).eval()
    acts = pytorch_fid_with.get_activations(image_files(folder), theirs, batch_size=1, device="cpu", num_workers=0)
    mu, sigma = activation_statistics(folder, model, batch_size=4)
    np.testing.assert_allclose(mu, acts.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(acts, rowvar=False), rtol=1e-4, atol=1e-7)


def test_accumulator_merges_batches_exactly() -> None:
    features = np.random.default_rng(0).normal(3.0, 2.0, (37, 2048))
    acc = FIDAccumulator()
    for start, stop in [(0, 1), (1, 11), (11, 12), (12, 37)]:
        acc.add_features(torch.from_numpy(features[start:stop]).float())
    mu, sigma = acc.statistics()
    rounded = features.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, rounded.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(rounded, rowvar=False), rtol=1e-10, atol=1e-10)
    with pytest.raises(SpadeError, match="at least 2"):
        FIDAccumulator().statistics()


def test_generated_tensors_give_the_statistics_of_their_saved_pngs(model: FIDInceptionV3, tmp_path: Path) -> None:
    from spade.synthesize import to_uint8

    fake = torch.rand(5, 3, 40, 56, generator=torch.Generator().manual_seed(3)) * 2.2 - 1.1  # beyond [-1, 1] too
    for i, image in enumerate(to_uint8(fake)):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    acc = FIDAccumulator(model, batch_size=2)
    acc.add_generated(fake[:3])
    acc.add_generated(fake[3:])
    mu, sigma = acc.statistics()
    mu_files, sigma_files = activation_statistics(tmp_path, model, batch_size=5)
    np.testing.assert_allclose(mu, mu_files, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sigma, sigma_files, rtol=1e-5, atol=1e-8)
    assert generated_to_unit(torch.tensor([-2.0, -1.0, 1.0, 3.0])).tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("n", [12, 400])  # fewer samples than dimensions (singular covariances), and more
def test_eigh_and_sqrtm_agree(n: int) -> None:
    rng = np.random.default_rng(n)
    mixing = rng.normal(size=(256, 256)) / 16
    x, y = rng.gamma(2.0, size=(n, 256)) @ mixing, rng.gamma(2.2, size=(n, 256)) @ mixing + 0.05
    stats_x, stats_y = (x.mean(0), np.cov(x, rowvar=False)), (y.mean(0), np.cov(y, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = pytorch_fid_score.calculate_frechet_distance(*stats_x, *stats_y)
    sqrtm = frechet_distance(*stats_x, *stats_y)
    eigh = frechet_distance(*stats_x, *stats_y, method="eigh")
    assert sqrtm == pytest.approx(theirs, rel=1e-12)
    assert eigh == pytest.approx(sqrtm, rel=1e-6)
    scale = np.trace(stats_x[1])  # a singular covariance leaves rounding noise of ~1e-7 of its trace
    assert abs(frechet_distance(*stats_x, *stats_x)) < 1e-6 * scale
    assert abs(frechet_distance(*stats_x, *stats_x, method="eigh")) < 1e-6 * scale


def test_frechet_distance_of_known_gaussians() -> None:
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 2.0])
    sigma1, sigma2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    # ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2 for commuting (diagonal) covariances
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(9 + 1 + 0 + 4)
    assert frechet_distance(mu1, sigma1, mu2, sigma2, method="eigh") == pytest.approx(9 + 1 + 0 + 4)
    with pytest.raises(SpadeError, match="do not match"):
        frechet_distance(mu1, sigma1, mu2[:2], sigma2[:2, :2])


def test_weights_and_images_from_s3(
    weights: Path,
    folders,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import boto3
    import moto

    for name in ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto.mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket="models")
        client.upload_file(str(weights), "models", f"fid/{WEIGHTS_NAME}")
        for image in image_files(folders["small_b"]):
            client.upload_file(str(image), "models", f"val/{image.name}")
        client.put_object(Bucket="models", Key="val/notes.txt", Body=b"not an image")

        from_s3 = folder_statistics("s3://models/val", weights="s3://models/fid/", cache_dir=tmp_path, progress=False)
        local = folder_statistics(folders["small_b"], weights=weights, cache_dir=tmp_path, progress=False)
        assert len(list(tmp_path.glob("fid-*.npz"))) == 1  # same images and weights: one cache entry
        np.testing.assert_array_equal(from_s3[0], local[0])
        with pytest.raises(SpadeError, match=f"s3://models/elsewhere/{WEIGHTS_NAME}"):
            load_fid_inception("s3://models/elsewhere")
