"""Training checkpoints: written atomically every N iterations, the last K kept, found again on resume.

Each file is a project checkpoint (spade.checkpoints.Checkpoint) whose `training`
entry holds what resuming needs: iteration, epoch and position in it, optimiser and
grad-scaler states, every rank's RNG states, the resolved settings and the MLflow
run id. Locations are local folders or s3://bucket/prefix.
"""

from __future__ import annotations

import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from spade.checkpoints import Checkpoint
from spade.errors import SpadeError
from spade.storage import Store

NAME = re.compile(r"^iter_(\d{8,})\.pt$")


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:08d}.pt"


def list_checkpoints(location: str) -> list[tuple[int, str]]:
    """(iteration, name) of the checkpoints in a location, oldest first."""
    found = []
    for name in Store(location).list():
        m = NAME.match(name)
        if m:
            found.append((int(m.group(1)), name))
    return sorted(found)


def save_checkpoint(ckpt: Checkpoint, location: str, iteration: int, keep: int) -> str:
    """Write the checkpoint for `iteration` and prune all but the newest `keep`."""
    store = Store(location)
    name = checkpoint_name(iteration)
    if store.s3:
        with tempfile.TemporaryDirectory() as tmp:
            local = ckpt.save(Path(tmp) / name)
            uri = store.put(local, name)
    else:
        uri = str(ckpt.save(store.path / name))
    for _, old in list_checkpoints(location)[:-keep]:
        store.delete(old)
    return uri


def load_latest(location: str) -> tuple[Checkpoint, str] | None:
    """The newest checkpoint in a folder or s3 prefix, or a checkpoint file; None when there is none."""
    if not Store(location).s3 and Path(location).is_file():
        return Checkpoint.load(location), location
    found = list_checkpoints(location)
    if not found:
        return None
    _, name = found[-1]
    store = Store(location)
    if not store.s3:
        return Checkpoint.load(store.path / name), store.uri(name)
    with tempfile.TemporaryDirectory() as tmp:
        return Checkpoint.load(store.get(name, Path(tmp) / name)), store.uri(name)


def capture_rng() -> dict:
    """This process's RNG states in a form torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "python": [random.getstate()[0], list(random.getstate()[1])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal = state["python"]
    random.setstate((version, tuple(internal), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_compatible(ckpt: Checkpoint, model_cfg_dict: dict, source: str) -> None:
    """Resuming needs the same networks: name every setting that differs."""
    saved = ckpt.config.to_dict()
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in model_cfg_dict.items() if saved.get(k) != v]
    if diffs:
        raise SpadeError(f"cannot resume from {source}: the model settings differ ({'; '.join(diffs)})")
    if ckpt.training is None:
        raise SpadeError(f"cannot resume from {source}: it holds no training state (optimisers, iteration)")
