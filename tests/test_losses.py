import math

import pytest
import torch
from torchvision.models import vgg19

from spade.errors import SpadeError
from spade.losses import GANLoss, VGGLoss, feature_matching_loss, kl_divergence
from spade.nn.vgg import VGG19_FILE, VGG19Features

LOGITS = torch.tensor([2.0, 0.5, -1.0, -3.0])


@pytest.mark.parametrize(
    "mode, real_d, fake_d, gen",
    [
        # hinge: mean(relu(1 - x)), mean(relu(1 + x)), -mean(x)
        ("hinge", (0 + 0.5 + 2 + 4) / 4, (3 + 1.5 + 0 + 0) / 4, -(2 + 0.5 - 1 - 3) / 4),
        # least squares: mean((x - 1)^2), mean(x^2), mean((x - 1)^2)
        ("ls", (1 + 0.25 + 4 + 16) / 4, (4 + 0.25 + 1 + 9) / 4, (1 + 0.25 + 4 + 16) / 4),
        # Wasserstein: -mean(x), mean(x), -mean(x)
        ("w", 0.375, -0.375, 0.375),
    ],
)
def test_gan_losses_by_hand(mode, real_d, fake_d, gen):
    loss = GANLoss(mode)
    assert loss(LOGITS, real=True).item() == pytest.approx(real_d)
    assert loss(LOGITS, real=False).item() == pytest.approx(fake_d)
    assert loss(LOGITS, real=True, for_discriminator=False).item() == pytest.approx(gen)


def test_original_gan_loss_is_binary_cross_entropy_on_logits():
    loss = GANLoss("original")
    softplus = [math.log1p(math.exp(-x)) for x in LOGITS.tolist()]  # -log(sigmoid(x))
    assert loss(LOGITS, real=True).item() == pytest.approx(sum(softplus) / 4)
    softplus_fake = [math.log1p(math.exp(x)) for x in LOGITS.tolist()]  # -log(1 - sigmoid(x))
    assert loss(LOGITS, real=False).item() == pytest.approx(sum(softplus_fake) / 4)


def test_gan_loss_averages_the_last_output_of_each_scale():
    ignored = torch.full((1, 1, 2, 2), 100.0)
    outputs = [[ignored, torch.tensor([2.0, 0.0])], [ignored, torch.tensor([-2.0])]]
    loss = GANLoss("hinge")
    # scale 0: relu(1-2)=0, relu(1-0)=1 -> 0.5; scale 1: relu(1+2)=3 -> 3; mean 1.75
    assert loss(outputs, real=True).item() == pytest.approx(1.75)
    real, fake = loss.discriminator(outputs, outputs)
    assert real.item() == pytest.approx(1.75)
    assert fake.item() == pytest.approx(((3 + 1) / 2 + 0) / 2)
    assert loss.generator(outputs).item() == pytest.approx((-1 + 2) / 2)


def test_unknown_gan_mode():
    with pytest.raises(SpadeError, match="unknown GAN loss 'wgan-gp'"):
        GANLoss("wgan-gp")


def test_feature_matching_by_hand():
    fake = [
        [torch.tensor([1.0, 2.0]), torch.tensor([0.0]), torch.tensor([9.0])],
        [torch.tensor([3.0]), torch.tensor([7.0])],
    ]
    real = [
        [torch.tensor([0.0, 0.0]), torch.tensor([1.0]), torch.tensor([-9.0])],
        [torch.tensor([1.0]), torch.tensor([0.0])],
    ]
    # scale 0: L1 = 1.5 + 1; scale 1: L1 = 2 (logits excluded); * 10 / 2 scales
    assert feature_matching_loss(fake, real).item() == pytest.approx((1.5 + 1 + 2) * 10 / 2)
    assert feature_matching_loss(fake, real, weight=1.0).item() == pytest.approx(4.5 / 2)


def test_feature_matching_does_not_train_through_real_features():
    real = [[torch.ones(2, requires_grad=True), torch.zeros(1)]]
    fake = [[torch.zeros(2, requires_grad=True), torch.zeros(1)]]
    feature_matching_loss(fake, real).backward()
    assert real[0][0].grad is None and fake[0][0].grad is not None


def test_kl_divergence_by_hand():
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    # 0.5 * sum(mu^2 + var - 1 - logvar) = 0.5 * (1 + 0 + (2 - 1 - ln 2))
    expected = 0.5 * (1 + 1 - math.log(2.0))
    assert kl_divergence(mu, logvar, weight=1.0).item() == pytest.approx(expected)
    assert kl_divergence(mu, logvar).item() == pytest.approx(expected * 0.05)
    assert kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hub") / VGG19_FILE
    torch.save(vgg19(weights=None).state_dict(), path)
    return path


def test_vgg_loss_weights_the_five_relu_layers(vgg_file):
    features = VGG19Features(vgg_file)
    fake, real = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    net = vgg19(weights=None)
    net.load_state_dict(torch.load(vgg_file, weights_only=True))
    taps = {1: 1 / 32, 6: 1 / 16, 11: 1 / 8, 20: 1 / 4, 29: 1.0}  # relu1_1 .. relu5_1
    expected, xf, xr = 0.0, fake, real
    with torch.no_grad():
        for i, layer in enumerate(net.features[:30]):
            xf, xr = layer(xf), layer(xr)
            if i in taps:
                expected += taps[i] * (xf - xr).abs().mean().item()
        got = VGGLoss(features)(fake, real).item()
    assert got == pytest.approx(10 * expected, rel=1e-5)
    assert VGGLoss(features)(real, real).item() == 0
    assert not any(p.requires_grad for p in features.parameters())


def test_vgg_weights_found_in_the_torch_hub_cache(vgg_file, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(vgg_file.parent.parent))
    (vgg_file.parent.parent / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (vgg_file.parent.parent / "hub" / "checkpoints" / VGG19_FILE).write_bytes(vgg_file.read_bytes())
    features = VGG19Features()
    assert len(features(torch.zeros(1, 3, 32, 32))) == 5


def test_missing_vgg_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(SpadeError) as err:
        VGG19Features()
    assert VGG19_FILE in str(err.value) and "--no-vgg-loss" in str(err.value)
    with pytest.raises(SpadeError, match="nowhere/vgg.pth does not exist"):
        VGG19Features(tmp_path / "nowhere" / "vgg.pth")


def test_wrong_vgg_file_is_refused(tmp_path):
    bad = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(SpadeError, match="not torchvision's VGG19"):
        VGG19Features(bad)
