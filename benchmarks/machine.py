"""The machine a benchmark ran on, for its JSON record."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

from spade.precision import cpu_kind, describe_cpu

RESULTS = Path(__file__).resolve().parent / "results"


def kind_slug(device: str = "cpu") -> str:
    """The folder name of this machine's kind: 'avx512-bf16', 'avx2' ('-capped' when an ISA cap is set), or the
    GPU's name for CUDA. Results of one kind live together, one README table per kind."""
    if device == "cuda" and torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    kind = cpu_kind()
    slug = kind["isa"].lower() + ("-bf16" if kind["bf16_native"] else "")
    return slug + ("-capped" if kind["isa_cap"] else "")


def default_out(name: str, device: str = "cpu") -> Path:
    """benchmarks/results/<kind>/<name>: where a benchmark writes unless --out says otherwise."""
    return RESULTS / kind_slug(device) / name


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
