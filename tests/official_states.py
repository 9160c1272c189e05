"""Random state dicts with exactly the keys and shapes of the authors' published checkpoints."""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import torch

SPEC_FILE = Path(__file__).parent / "fixtures" / "official_spade_checkpoints.json"


@cache
def spec() -> dict:
    return json.loads(SPEC_FILE.read_text())


def random_state(preset: str, network: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Values at realistic scales: conv weights ~ 1/sqrt(fan_in), spectral vectors from a few
    power iterations (so sigma is near the top singular value), positive running variances."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    shapes = spec()[preset][network]
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_mean"):
            out[key] = torch.randn(shape, generator=g) * 0.1
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) * 1.5 + 0.5
        elif key.endswith(("weight_u", "weight_v")):
            continue
        elif key.endswith("bias"):
            out[key] = torch.randn(shape, generator=g) * 0.02
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            out[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    for key in shapes:
        if key.endswith("weight_orig"):
            prefix = key.removesuffix("_orig")
            w = out[key].reshape(out[key].shape[0], -1)
            v = torch.nn.functional.normalize(torch.randn(w.shape[1], generator=g), dim=0)
            for _ in range(3):
                u = torch.nn.functional.normalize(w @ v, dim=0)
                v = torch.nn.functional.normalize(w.t() @ u, dim=0)
            out[f"{prefix}_u"], out[f"{prefix}_v"] = u, v
    return {k: out[k] for k in shapes}
