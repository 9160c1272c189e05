"""The machine a benchmark ran on, for its JSON record."""

from __future__ import annotations

import os
import platform

import torch

from spade.precision import cpu_kind, describe_cpu


def describe() -> dict:
    kind = cpu_kind()
    info = {
        "cpu": kind["model"],
        "cpu_isa": kind["isa"],
        "cpu_isa_cap": kind["isa_cap"],
        "cpu_kind": describe_cpu(kind),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "bf16_native": kind["bf16_native"],
        "cuda": None,
    }
    if torch.cuda.is_available():
        info["cuda"] = {"device": torch.cuda.get_device_name(0), "version": torch.version.cuda}
    return info
