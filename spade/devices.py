"""Device names from the command line, params.yaml and pipeline parameters, resolved in one way."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from spade.errors import SpadeError

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # "<quota> <period>" or "max <period>"


def resolve_device(device: str | torch.device) -> torch.device:
    """ "auto" (or "") -> cuda when this machine has a GPU, else cpu; any other name as a torch.device,
    refusing an accelerator this machine does not have."""
    if device in ("auto", ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SpadeError(f"device {device!r} is not a torch device, like 'cpu' or 'cuda:0' ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpadeError(f"device {str(device)!r} asked for, but this machine has no CUDA GPU; use cpu")
    return dev


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity set, capped by a cgroup (v2) CPU quota, as a pod's
    `limits.cpu` sets it (os.cpu_count() counts the whole node's)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)
