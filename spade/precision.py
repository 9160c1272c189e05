"""Numeric precision: which ones a device runs natively, "auto", and autocast.

Synthesis, serving, evaluation and training all resolve their `precision`
setting here, so "auto" means the same everywhere: bfloat16 where the device
runs bf16 matrix products natively (AMX / AVX512-BF16 CPUs, Ampere+ GPUs), else
float32, the exact path.
"""

from __future__ import annotations

import contextlib

import torch

from spade.config import INFERENCE_PRECISIONS
from spade.errors import SpadeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bf16_supported(device: torch.device | str) -> bool:
    """Whether bf16 matrix products run natively (AMX / AVX512-BF16 on CPU, Ampere+ on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(
    precision: str, device: torch.device | str, *, choices: tuple[str, ...] = INFERENCE_PRECISIONS
) -> str:
    """ "auto" -> "bfloat16" where the device runs it natively, else "float32"; one of `choices` passes through."""
    if precision == "auto":
        return "bfloat16" if bf16_supported(device) else "float32"
    if precision not in choices:
        raise SpadeError(f"unknown precision {precision!r}; use auto, {', '.join(choices)}")
    return precision


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast on `device`, or nothing for float32."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])
