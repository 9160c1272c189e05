"""The inference generator: a trained generator's arithmetic, rearranged for speed.

`InferenceGenerator.from_generator(g)` computes what `g.eval()` computes, from
the same weights (checkpoints stay as they are), with less work:

- Spectral norm is folded into plain weights (`weight_orig / sigma` from the
  stored power-iteration vectors): no power iteration, no division per call.
- Eval batch norm in every SPADE layer is folded into its gamma / beta
  convolution, and gamma and beta come from one convolution with 2C outputs:
  `norm(x) * (1 + gamma) + beta` becomes `x * G + B`. Before the learned
  shortcut's 1x1 convolution P, P(x G + B) = P(x G) + P B, and P B is folded
  into the beta weights (half the outputs where the block halves the width).
- The first SPADE convolution reads a one-hot label map, so it is a sum of
  weight columns picked by the class (and instance-edge) of each neighbour:
  a table lookup (`embedding_bag`) instead of a 184-channel convolution. The
  generator's first layer (the label map at 8x8) works the same way.
- The label map is resized once per resolution and shared by every SPADE layer
  at that resolution (`LabelPlan`).
- G and B at a pixel depend only on the labels within two kernel radii of it.
  Where that window holds one class and lies inside the image, G and B are a
  per-class constant, computed once when the module is built; the convolution
  runs only on the pixels near a boundary (a gather + one matrix product). When
  too many pixels are near a boundary for that to pay, the plain convolution runs.
- Weights can be stored in bfloat16, with activations kept channels-last.

In float32 the memory format stays NCHW: oneDNN's channels-last float32
convolutions are several times less exact (about 1e-5 against float64 on the coco
generator, against 3e-6 for NCHW), and float32 is the exact path. There the
result equals the eager generator up to rounding (the tests hold it to 1e-5);
bfloat16 is compared by PSNR.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spade.errors import SpadeError
from spade.nn.generator import SPADEGenerator
from spade.nn.resblock import SPADEResBlock
from spade.nn.spade_norm import SPADE
from spade.nn.spectral import SpectralNormConv2d

# The gathered convolution copies k*k*hidden values per boundary pixel; in the time of that copy the
# plain convolution does about this many multiply-adds per output channel and pixel (measured on CPU).
GATHER_COST = 512
# None: choose per layer by cost; True / False: always / never gather (tests use this)
FORCE_GATHER: bool | None = None


def use_gather(boundary: int, pixels: int, out_channels: int) -> bool:
    """Whether convolving only the `boundary` pixels (plus the copy) beats convolving all `pixels`."""
    if FORCE_GATHER is not None:
        return FORCE_GATHER
    return boundary * (out_channels + GATHER_COST) < pixels * out_channels


def effective_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The weight a convolution applies in eval mode (spectral norm from its stored u, v)."""
    if isinstance(conv, SpectralNormConv2d):
        was_training = conv.training
        conv.eval()
        try:
            with torch.no_grad():
                return conv.normalized_weight().detach().clone()
        finally:
            conv.train(was_training)
    return conv.weight.detach().clone()


def memory_format_for(dtype: torch.dtype) -> torch.memory_format:
    """channels-last for the reduced precisions, NCHW for float32 (see the module's notes)."""
    return torch.contiguous_format if dtype == torch.float32 else torch.channels_last


def _holding(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, **to: object) -> nn.Module:
    """`module`, built on the meta device (no random initialisation to pay for), given frozen copies of
    `weight` and `bias` converted as `to` says (dtype, memory_format)."""
    module.weight = nn.Parameter(weight.detach().to(copy=True, **to), requires_grad=False)
    to.pop("memory_format", None)
    module.bias = None if bias is None else nn.Parameter(bias.detach().to(copy=True, **to), requires_grad=False)
    return module


def _plain_conv(conv: nn.Conv2d, dtype: torch.dtype) -> nn.Conv2d:
    """A plain Conv2d holding `conv`'s effective weight, in `dtype` and its memory format."""
    with torch.device("meta"):
        out = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            bias=conv.bias is not None,
        )
    return _holding(out, effective_weight(conv), conv.bias, dtype=dtype, memory_format=memory_format_for(dtype))


def onehot_table(weight: torch.Tensor, bias: torch.Tensor | None, n_onehot: int, edge: bool) -> torch.Tensor:
    """The lookup table that replaces a convolution over [one-hot classes (+ an edge channel)].

    weight: (out, n_onehot [+ 1], k, k). Row `pos * J + j` holds the contribution
    of a neighbour at kernel position `pos` whose joint index is j = class * E + edge
    (E = 2 with an edge channel, else 1); j = n_onehot * E is the zero padding.
    The bias sits on the centre position, which is never padding.
    """
    out_c, in_c, kh, kw = weight.shape
    if in_c != n_onehot + int(edge):
        raise SpadeError(f"a one-hot convolution over {n_onehot} classes (edge: {edge}) cannot take {in_c} channels")
    w = weight.detach().double()
    per_pos = w[:, :n_onehot].permute(2, 3, 1, 0).reshape(kh * kw, n_onehot, out_c)
    per_pos = torch.cat([per_pos, per_pos.new_zeros(kh * kw, 1, out_c)], dim=1)  # + the padding "class"
    if edge:
        edge_w = w[:, n_onehot].permute(1, 2, 0).reshape(kh * kw, 1, out_c)
        table = torch.stack([per_pos, per_pos + edge_w], dim=2)  # (pos, class, edge, out); (n_onehot, 1) unused
    else:
        table = per_pos.unsqueeze(2)
    if bias is not None:
        table[(kh // 2) * kw + kw // 2] += bias.detach().double()
    return table.reshape(-1, out_c)


class LabelLevel:
    """The label map at one resolution, with the indices every SPADE layer there shares."""

    def __init__(self, joint: torch.Tensor, joint_classes: int, padding: int) -> None:
        self.joint = joint  # (N, h, w) int64: class * E + edge
        self.joint_classes = joint_classes  # J: number of joint values, the padding ones included
        self.padding = padding  # the joint value of the zero padding (class n_onehot, no edge)
        self._bag: dict[int, torch.Tensor] = {}
        self._neighbours: dict[int, torch.Tensor] = {}
        self._boundary: dict[int, torch.Tensor] = {}

    @property
    def pixels(self) -> int:
        return self.joint.numel()

    def bag_index(self, k: int) -> torch.Tensor:
        """(N*h*w, k*k) table rows for a k x k one-hot convolution (zero padding = the padding value)."""
        if k not in self._bag:
            n, h, w = self.joint.shape
            p = k // 2
            padded = F.pad(self.joint, (p, p, p, p), value=self.padding)
            cols = [
                padded[:, dy : dy + h, dx : dx + w] + (dy * k + dx) * self.joint_classes
                for dy in range(k)
                for dx in range(k)
            ]
            self._bag[k] = torch.stack(cols, dim=-1).reshape(n * h * w, k * k)
        return self._bag[k]

    def neighbours(self, k: int) -> torch.Tensor:
        """(N*h*w, k*k) row numbers of each pixel's k x k neighbours; N*h*w stands for the zero padding."""
        if k not in self._neighbours:
            n, h, w = self.joint.shape
            p = k // 2
            rows = torch.arange(n * h * w, device=self.joint.device).view(n, h, w)
            padded = F.pad(rows, (p, p, p, p), value=n * h * w)
            cols = [padded[:, dy : dy + h, dx : dx + w] for dy in range(k) for dx in range(k)]
            self._neighbours[k] = torch.stack(cols, dim=-1).reshape(n * h * w, k * k)
        return self._neighbours[k]

    def boundary(self, radius: int) -> torch.Tensor:
        """Flat indices of the pixels whose (2 radius + 1)^2 window leaves the image or holds two joint values."""
        if radius not in self._boundary:
            if radius == 0:
                self._boundary[radius] = self.joint.new_empty(0)
            else:
                j = F.pad(self.joint.unsqueeze(1).float(), (radius,) * 4, value=-1.0)
                size = 2 * radius + 1
                hi = F.max_pool2d(j, size, stride=1)
                lo = -F.max_pool2d(-j, size, stride=1)
                self._boundary[radius] = (hi != lo).flatten().nonzero().squeeze(1)
        return self._boundary[radius]


class LabelPlan:
    """A batch of label maps (class ids + instance edges), resized on demand once per resolution."""

    def __init__(self, ids: torch.Tensor, edge: torch.Tensor | None, *, n_onehot: int, use_edge: bool) -> None:
        if ids.dim() != 3:
            raise SpadeError(f"class ids must be (N, H, W), got shape {tuple(ids.shape)}")
        if use_edge and edge is None:
            raise SpadeError("this generator uses instance edges: an edge map is required")
        factor = 2 if use_edge else 1
        joint = ids.long() * factor
        if use_edge:
            joint = joint + edge.long()
        self.full = joint
        self.joint_classes = (n_onehot + 1) * factor
        self.padding = n_onehot * factor
        self._levels: dict[tuple[int, int], LabelLevel] = {}

    def at(self, size: tuple[int, int]) -> LabelLevel:
        if size not in self._levels:
            joint = self.full
            if tuple(joint.shape[-2:]) != size:
                # nearest, exactly as the reference resizes the one-hot map (values < 2^24 are exact in float)
                joint = F.interpolate(joint.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1).long()
            self._levels[size] = LabelLevel(joint, self.joint_classes, self.padding)
        return self._levels[size]


class OneHotConv(nn.Module):
    """A convolution over a one-hot label map (+ edge channel), done as a table lookup."""

    def __init__(self, table: torch.Tensor, k: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.k = k
        self.register_buffer("table", table.to(dtype))

    @staticmethod
    def exact_table(conv: nn.Conv2d, *, n_onehot: int, use_edge: bool) -> torch.Tensor:
        """`onehot_table` of a square, same-padded convolution, in float64."""
        if conv.kernel_size[0] != conv.kernel_size[1] or conv.padding[0] != conv.kernel_size[0] // 2:
            raise SpadeError("only square, same-padded convolutions can become a one-hot table")
        bias = conv.bias.detach() if conv.bias is not None else None
        return onehot_table(effective_weight(conv), bias, n_onehot, use_edge)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, n_onehot: int, use_edge: bool, dtype: torch.dtype) -> OneHotConv:
        return cls(cls.exact_table(conv, n_onehot=n_onehot, use_edge=use_edge), conv.kernel_size[0], dtype)

    def rows(self, level: LabelLevel) -> torch.Tensor:
        """(N*h*w, out) outputs, one row per pixel."""
        return F.embedding_bag(level.bag_index(self.k), self.table, mode="sum")

    def forward(self, level: LabelLevel) -> torch.Tensor:
        n, h, w = level.joint.shape
        return self.rows(level).view(n, h, w, -1).permute(0, 3, 1, 2)


class FoldedSPADE(nn.Module):
    """SPADE with its norm folded into one gamma/beta convolution: out = x * G + B.

    With eval batch norm (running statistics), G = a (1 + gamma) and
    B = beta - mean a (1 + gamma), a = 1 / sqrt(var + eps), all inside the
    convolution's weights. With instance norm the norm stays: out = norm(x) * G + B.
    """

    def __init__(
        self,
        spade: SPADE,
        *,
        n_onehot: int,
        use_edge: bool,
        dtype: torch.dtype,
        project: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        norm = spade.param_free_norm
        shared = spade.mlp_shared[0]
        table = OneHotConv.exact_table(shared, n_onehot=n_onehot, use_edge=use_edge)
        self.shared = OneHotConv(table, shared.kernel_size[0], dtype)
        wg, bg = spade.mlp_gamma.weight.detach().double(), spade.mlp_gamma.bias.detach().double()
        wb, bb = spade.mlp_beta.weight.detach().double(), spade.mlp_beta.bias.detach().double()
        self.channels = wg.shape[0]
        self.k = wg.shape[-1]
        self.instance_norm: nn.Module | None = None
        if isinstance(norm, nn.InstanceNorm2d):
            self.instance_norm = norm
            w_g, b_g, w_b, b_b = wg, 1 + bg, wb, bb
        elif getattr(norm, "running_mean", None) is not None:
            scale = (norm.running_var.double() + norm.eps).rsqrt()
            shift = norm.running_mean.double() * scale
            w_g, b_g = wg * scale.view(-1, 1, 1, 1), scale * (1 + bg)
            w_b, b_b = wb - wg * shift.view(-1, 1, 1, 1), bb - shift * (1 + bg)
        else:
            raise SpadeError(f"cannot fold {type(norm).__name__} (batch norm without running statistics)")
        if project is not None:
            # a 1x1 convolution P follows (the learned shortcut): P(x G + B) = P(x G) + (P B), and P B is a
            # 3x3 convolution of the hidden map with P's output width instead of the input's
            p = project.detach().double()
            w_b, b_b = torch.einsum("oc,chij->ohij", p, w_b), p @ b_b
        self.memory_format = memory_format_for(dtype)
        weight = torch.cat([w_g, w_b])
        bias = torch.cat([b_g, b_b])
        self.register_buffer("weight", weight.to(dtype).contiguous(memory_format=self.memory_format))
        self.register_buffer("bias", bias.to(dtype))
        # the gathered convolution's (k*k*hidden, 2C) matrix: a view of channels-last weights, else a copy
        matrix = self.weight.permute(2, 3, 1, 0).reshape(-1, self.weight.shape[0])
        copied = matrix.data_ptr() != self.weight.data_ptr()
        self.register_buffer("matrix", matrix if copied else None, persistent=False)
        # the modulation of a window that holds a single joint value j everywhere
        hidden = F.relu(table.view(self.shared.k**2, -1, wg.shape[1]).sum(0))
        self.register_buffer("constant", (hidden @ weight.sum(dim=(2, 3)).t() + bias).to(dtype))

    @property
    def radius(self) -> int:
        return self.shared.k // 2 + self.k // 2

    def modulation(self, level: LabelLevel) -> torch.Tensor:
        """(N, 2C, h, w) channels-last: G then B."""
        n, h, w = level.joint.shape
        hidden = F.relu_(self.shared.rows(level))  # (N*h*w, hidden)
        boundary = level.boundary(self.radius)
        if not use_gather(boundary.numel(), level.pixels, self.weight.shape[0]):
            actv = hidden.view(n, h, w, -1).permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format)
            return F.conv2d(actv, self.weight, self.bias, padding=self.k // 2)
        out = F.embedding(level.joint.flatten(), self.constant)  # (N*h*w, 2C)
        if boundary.numel():
            padded = torch.cat([hidden, hidden.new_zeros(1, hidden.shape[1])])
            patches = padded[level.neighbours(self.k)[boundary]].flatten(1)  # (B, k*k*hidden)
            out[boundary] = torch.addmm(self.bias, patches, self._matrix())
        return out.view(n, h, w, -1).permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format)

    def _matrix(self) -> torch.Tensor:
        if self.matrix is not None:
            return self.matrix
        # channels-last weights are (2C, k, k, hidden) in memory: a transposed (k*k*hidden, 2C) matrix, no copy
        return self.weight.permute(2, 3, 1, 0).reshape(-1, self.weight.shape[0])

    def forward(self, x: torch.Tensor, level: LabelLevel, project: nn.Conv2d | None = None) -> torch.Tensor:
        """x G + B; with `project` (the 1x1 convolution this layer was built with), project(x G) + (P B)."""
        mod = self.modulation(level)
        gain, shift = mod[:, : self.channels], mod[:, self.channels :]
        if self.instance_norm is not None:
            x = self.instance_norm(x)
        if project is not None:
            return project(x * gain).add_(shift)
        return torch.addcmul(shift, x, gain)


class FoldedResBlock(nn.Module):
    def __init__(self, block: SPADEResBlock, *, n_onehot: int, use_edge: bool, dtype: torch.dtype) -> None:
        super().__init__()
        spade = dict(n_onehot=n_onehot, use_edge=use_edge, dtype=dtype)
        self.learned_shortcut = block.learned_shortcut
        self.conv_0 = _plain_conv(block.conv_0, dtype)
        self.conv_1 = _plain_conv(block.conv_1, dtype)
        self.norm_0 = FoldedSPADE(block.norm_0, **spade)
        self.norm_1 = FoldedSPADE(block.norm_1, **spade)
        if self.learned_shortcut:
            self.conv_s = _plain_conv(block.conv_s, dtype)
            self.norm_s = FoldedSPADE(block.norm_s, **spade, project=effective_weight(block.conv_s)[:, :, 0, 0])

    def forward(self, x: torch.Tensor, plan: LabelPlan) -> torch.Tensor:
        level = plan.at(tuple(x.shape[-2:]))
        shortcut = self.norm_s(x, level, project=self.conv_s) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu_(self.norm_0(x, level), 0.2))
        dx = self.conv_1(F.leaky_relu_(self.norm_1(dx, level), 0.2))
        return dx.add_(shortcut)


class InferenceGenerator(nn.Module):
    """The folded generator: class ids (+ instance edges) [+ style z] -> image in [-1, 1]."""

    def __init__(self, g: SPADEGenerator, *, n_onehot: int, use_edge: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.n_onehot, self.use_edge, self.dtype = n_onehot, use_edge, dtype
        self.num_upsampling_layers = g.num_upsampling_layers
        self.use_vae, self.z_dim, self.sh, self.sw = g.use_vae, g.z_dim, g.sh, g.sw
        spade = dict(n_onehot=n_onehot, use_edge=use_edge, dtype=dtype)
        if g.use_vae:
            with torch.device("meta"):
                fc = nn.Linear(g.fc.in_features, g.fc.out_features)
            self.fc = _holding(fc, g.fc.weight, g.fc.bias, dtype=dtype)
        else:
            self.fc = OneHotConv.from_conv(g.fc, **spade)
        names = ["head_0", "G_middle_0", "G_middle_1", "up_0", "up_1", "up_2", "up_3"]
        if g.num_upsampling_layers == "most":
            names.append("up_4")
        self.blocks = nn.ModuleDict({name: FoldedResBlock(getattr(g, name), **spade) for name in names})
        self.conv_img = _plain_conv(g.conv_img, dtype)

    @classmethod
    def from_generator(
        cls, g: SPADEGenerator, *, n_onehot: int, use_edge: bool, dtype: torch.dtype = torch.float32
    ) -> InferenceGenerator:
        """Fold an (eval-mode) generator; `n_onehot` one-hot channels, then the edge channel when `use_edge`."""
        return cls(g, n_onehot=n_onehot, use_edge=use_edge, dtype=dtype).eval()

    def plan(self, ids: torch.Tensor, edge: torch.Tensor | None) -> LabelPlan:
        return LabelPlan(ids, edge, n_onehot=self.n_onehot, use_edge=self.use_edge)

    @torch.inference_mode()
    def forward(
        self, ids: torch.Tensor, edge: torch.Tensor | None = None, z: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ids: (N, H, W) one-hot channel of each pixel; edge: (N, H, W) 0/1; z: (N, z_dim). Returns float32."""
        plan = self.plan(ids, edge)
        n = ids.shape[0]
        if self.use_vae:
            if z is None or z.shape != (n, self.z_dim):
                raise SpadeError(f"style vector z must have shape ({n}, {self.z_dim})")
            x = self.fc(z.to(self.dtype)).view(n, -1, self.sh, self.sw)
        else:
            x = self.fc(plan.at((self.sh, self.sw)))
        x = x.contiguous(memory_format=memory_format_for(self.dtype))
        blocks = self.blocks
        x = blocks["head_0"](x, plan)
        x = _up(x)
        x = blocks["G_middle_0"](x, plan)
        if self.num_upsampling_layers in ("more", "most"):
            x = _up(x)
        x = blocks["G_middle_1"](x, plan)
        for name in ("up_0", "up_1", "up_2", "up_3"):
            x = blocks[name](_up(x), plan)
        if self.num_upsampling_layers == "most":
            x = blocks["up_4"](_up(x), plan)
        x = self.conv_img(F.leaky_relu(x, 0.2))
        return torch.tanh(x.float())


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")
