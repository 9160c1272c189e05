"""Numeric precision: which ones a device runs natively, "auto", and autocast.

Synthesis, serving, evaluation and training all resolve their `precision`
setting here, so "auto" means the same everywhere: bfloat16 where the device
runs bf16 matrix products natively (AMX / AVX512-BF16 CPUs, Ampere+ GPUs), else
float32, the exact path.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

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


# what caps the instruction set the CPU kernels use (AVX2 here makes an AVX-512 BF16 CPU compute as an
# AVX2-only one does, bf16 detection included)
ISA_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_kind() -> dict:
    """What the CPU kernels of this process run on: the model, the vector ISA PyTorch dispatches to
    (AVX512, AVX2, ...), whether bf16 products run natively (what `auto` follows), and any ISA cap set
    in the environment (oneDNN's, ATen's and MKL's), so a figure says what produced it."""
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        isa = "unknown"
    capped = {k: os.environ[k] for k in ISA_CAP_VARIABLES if os.environ.get(k)}
    return {"model": cpu_model(), "isa": isa, "bf16_native": bf16_supported("cpu"), "isa_cap": capped or None}


def describe_cpu(kind: dict | None = None) -> str:
    """One line: 'AMD EPYC 9R14, AVX512, bf16 native' (with the cap when the environment sets one)."""
    kind = kind or cpu_kind()
    line = f"{kind['model']}, {kind['isa']}, bf16 {'native' if kind['bf16_native'] else 'not native'}"
    if kind.get("isa_cap"):
        line += " (capped: " + ", ".join(f"{k}={v}" for k, v in kind["isa_cap"].items()) + ")"
    return line


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
