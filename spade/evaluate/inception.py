"""The Inception-v3 used for FID: the TensorFlow 2015-12-05 graph as ported to PyTorch by pytorch-fid.

It differs from torchvision's Inception-v3 in three places, all in the pooling branch of the
mixed blocks: A / C / first E average without counting the zero padding (TensorFlow's
behaviour), the second E (Mixed_7c) takes a max instead of an average, and the classifier has
1008 classes. Parameter names follow torchvision's, so `pt_inception-2015-12-05-6726825d.pth`
loads strictly; `fc` is only there for that reason, FID uses the 2048-d pool3 features.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spade.data.fingerprint import file_digest
from spade.errors import SpadeError
from spade.storage import Store, is_s3
from spade.weights import find_weights, load_state_dict

log = logging.getLogger(__name__)

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub convention: the name ends in the start of the file's sha256
FEATURE_DIM = 2048
INPUT_SIZE = 299
WEIGHTS_HINT = f" (the FID Inception weights, published at {WEIGHTS_URL})"


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (TensorFlow's eps 1e-3), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv: int | tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def pool_3x3(x: Tensor, kind: Literal["avg", "max"]) -> Tensor:
    """The stride-1 3x3 pooling of a mixed block's pool branch; the average ignores the padding."""
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = ConvBN(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = ConvBN(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = ConvBN(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, kernel_size=3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(pool_3x3(x, "avg"))
        return torch.cat([self.branch1x1(x), b5, b3, pool], 1)


class ReductionB(nn.Module):
    """35x35 -> 17x17: strided 3x3, strided double 3x3 and max pool."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = ConvBN(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = ConvBN(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = ConvBN(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            b7dbl = conv(b7dbl)
        b7dbl = self.branch7x7dbl_5(b7dbl)
        pool = self.branch_pool(pool_3x3(x, "avg"))
        return torch.cat([self.branch1x1(x), b7, b7dbl, pool], 1)


class ReductionD(nn.Module):
    """17x17 -> 8x8: strided 3x3, 7x7-then-strided-3x3 and max pool."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = ConvBN(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = ConvBN(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class MixedE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; `pool` is "avg" in Mixed_7b and "max" in Mixed_7c."""

    def __init__(self, in_channels: int, pool: Literal["avg", "max"]) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = ConvBN(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = ConvBN(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = ConvBN(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        pool = self.branch_pool(pool_3x3(x, self.pool))
        return torch.cat([self.branch1x1(x), b3, b3dbl, pool], 1)


def resize_for_inception(images01: Tensor) -> Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 3, 299, 299), bilinear without corner alignment (as pytorch-fid)."""
    if images01.shape[-2:] == (INPUT_SIZE, INPUT_SIZE):
        return images01  # the same-size bilinear resize is the identity
    return F.interpolate(images01, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)


@contextmanager
def _no_tf32(device: torch.device):
    """cuDNN convolutions in full float32: TF32 would shift FID by an amount nobody reports."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


class FIDInceptionV3(nn.Module):
    """Images in [0, 1], any size -> (N, 2048) pool3 features of the FID Inception network.

    `load_fid_inception` builds it with its weights; `weights_id` then names the file's content,
    which keys the FID statistics cache.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, kernel_size=3)
        self.Mixed_5b = MixedA(192, pool_features=32)
        self.Mixed_5c = MixedA(256, pool_features=64)
        self.Mixed_5d = MixedA(288, pool_features=64)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = MixedC(768, channels_7x7=128)
        self.Mixed_6c = MixedC(768, channels_7x7=160)
        self.Mixed_6d = MixedC(768, channels_7x7=160)
        self.Mixed_6e = MixedC(768, channels_7x7=192)
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = MixedE(1280, pool="avg")
        self.Mixed_7c = MixedE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, 1008)  # the 1008-class head of the TF graph; unused for FID
        self.weights_id: str | None = None
        self.eval().requires_grad_(False)

    def features(self, images01: Tensor) -> Tensor:
        x = 2 * resize_for_inception(images01) - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, images01: Tensor) -> Tensor:
        if images01.ndim != 4 or images01.shape[1] != 3:
            raise SpadeError(f"FID Inception expects RGB images (N, 3, H, W) in [0, 1], got {tuple(images01.shape)}")
        with _no_tf32(images01.device):
            return self.features(images01)


def weights_digest(path: Path) -> str:
    """sha256 of a weights file, remembered per (path, size, mtime) so repeated calls do not re-read it."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(path)
    return _DIGESTS[key]


_DIGESTS: dict[tuple[str, int, int], str] = {}


@contextmanager
def local_weights(weights: str | Path | None):
    """A local path to the FID weights: `weights` itself, the file in a folder or s3:// prefix, a
    downloaded copy of an s3:// object (removed afterwards), or the torch hub cache when None."""
    if weights is not None and is_s3(weights):
        uri = str(weights).rstrip("/")
        folder, _, name = uri.rpartition("/")
        if not name.endswith((".pth", ".pt")):
            folder, name = uri, WEIGHTS_NAME
        with tempfile.TemporaryDirectory(prefix="spade-fid-") as tmp:
            yield Store(folder).get(name, Path(tmp) / name)
        return
    yield find_weights(weights, WEIGHTS_NAME, what="FID Inception", hint=WEIGHTS_HINT)


def weights_identity(weights: str | Path | None) -> str:
    """Short content id of the FID weights `weights` resolves to (downloads an s3:// file to hash it)."""
    with local_weights(weights) as path:
        return weights_digest(path)[:16]


def load_fid_inception(weights: str | Path | None = None, *, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID Inception network with `pt_inception-2015-12-05-6726825d.pth` loaded strictly.

    `weights`: the file, a folder holding it, an s3:// URI (of the file or of its folder), or None for
    the torch hub cache ($TORCH_HOME/hub/checkpoints). Nothing is downloaded from the internet.
    """
    model = FIDInceptionV3()
    with local_weights(weights) as path:
        state = load_state_dict(path, what="FID Inception weights")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise SpadeError(
                f"{path}: not the FID Inception-v3 weights ({WEIGHTS_NAME} from pytorch-fid): {exc}"
            ) from None
        digest = weights_digest(path)
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        log.warning(
            "%s is not the standard FID Inception file (sha256 %s..., expected %s...): "
            "its FID values are not comparable with published ones",
            path,
            digest[:8],
            WEIGHTS_SHA256_PREFIX,
        )
    model.weights_id = digest[:16]
    return model.to(device)


def state_dict_digest(state: dict[str, Tensor]) -> str:
    """Content id of an in-memory state dict (for a model built without a file)."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
