"""Finding pretrained weight files on disk without any download."""

from __future__ import annotations

from pathlib import Path

import torch

from spade.errors import SpadeError


def hub_checkpoint_dir() -> Path:
    """Where torch.hub keeps downloaded weights ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(path: str | Path | None, default_name: str, *, what: str, hint: str = "") -> Path:
    """Resolve a weights file: an explicit path, else `default_name` in the torch hub cache.

    A missing file raises an error that names the file and every place looked at.
    """
    if path is not None:
        candidate = Path(path).expanduser()
        if candidate.is_dir():
            candidate = candidate / default_name
        if candidate.is_file():
            return candidate
        raise SpadeError(f"{what} weights not found: {candidate} does not exist{hint}")
    cached = hub_checkpoint_dir() / default_name
    if cached.is_file():
        return cached
    raise SpadeError(
        f"{what} weights not found: no path given and {default_name} is not in the torch hub cache "
        f"({cached}); this machine cannot download it, so copy the file there or pass its path{hint}"
    )


def load_state_dict(path: Path, *, what: str) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True and an error that names the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SpadeError(f"{path}: no such file") from None
    except Exception as exc:  # pickle errors, truncated zips, unsafe globals...
        raise SpadeError(f"{path}: cannot load {what} ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise SpadeError(f"{path}: expected a state dict for {what}, found a {type(state).__name__}")
    return state
