"""Device names from the command line, params.yaml and pipeline parameters, resolved in one way."""

from __future__ import annotations

import torch

from spade.errors import SpadeError


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
