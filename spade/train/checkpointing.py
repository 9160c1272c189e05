"""Training checkpoints: written atomically every N iterations, the last K kept, found again on resume.

Each file is a project checkpoint (spade.checkpoints.Checkpoint) whose `training`
entry holds what resuming needs: iteration, epoch and position in it, optimiser and
grad-scaler states, every rank's RNG states, the resolved settings and the MLflow
run id. Locations are local folders or s3://bucket/prefix.
"""

from __future__ import annotations

import random
import re
import sys
import tempfile
import time
from collections.abc import Callable
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


class CheckpointUnavailable(SpadeError):
    """A checkpoint that exists but could not be fetched (the store did not answer): not a reason to skip it."""


def load_checkpoint(uri: str) -> Checkpoint:
    """One checkpoint by its path or s3:// URI (what load_latest returned as its source)."""
    if not Store(uri).s3 and Path(uri).is_file():
        return Checkpoint.load(uri)
    parent, _, name = uri.rstrip("/").rpartition("/")
    return _load_resumable(Store(parent), name)


def load_latest(location: str, *, say: Callable[[str], None] | None = None) -> tuple[Checkpoint, str] | None:
    """The newest checkpoint that loads in a folder or s3 prefix, or a checkpoint file; None when there is none.

    A newer checkpoint that cannot be read (truncated by a full disk, a copy cut off) is passed over for
    the one before it, and `say` (default: stderr) is told which were skipped and why. When none loads,
    SpadeError lists them all.
    """
    say = say or (lambda line: print(line, file=sys.stderr))
    if not Store(location).s3 and Path(location).is_file():
        return Checkpoint.load(location), location
    found = list_checkpoints(location)
    if not found:
        return None
    store = Store(location)
    skipped: list[str] = []
    for _, name in reversed(found):
        try:
            ckpt = _load_resumable(store, name)
        except CheckpointUnavailable:
            raise
        except SpadeError as exc:
            skipped.append(f"{store.uri(name)}: {exc}")
            continue
        if skipped:
            say(f"resume: skipped {len(skipped)} unreadable checkpoint(s), newest first:")
            for line in skipped:
                say(f"  {line}")
        return ckpt, store.uri(name)
    raise SpadeError(f"none of the {len(found)} checkpoint(s) in {location} can be loaded:\n  " + "\n  ".join(skipped))


def _load_resumable(store: Store, name: str) -> Checkpoint:
    """The checkpoint `name` of `store`. Only a file that cannot be read raises SpadeError (and is passed
    over); a download that fails raises CheckpointUnavailable, which stops the resume: passing over a
    checkpoint that is only out of reach for a moment would redo its work, or, under torchrun, let the
    processes start from different checkpoints."""
    if store.s3:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = store.get(name, Path(tmp) / name)
            except SpadeError as exc:
                raise CheckpointUnavailable(f"cannot download {store.uri(name)} to resume from it: {exc}") from None
            ckpt = Checkpoint.load(local)
    else:
        ckpt = Checkpoint.load(store.path / name)
    if not isinstance(ckpt.training, dict) or "iteration" not in ckpt.training:
        raise SpadeError("it holds no training state (written by something other than spade train)")
    return ckpt


STALE_AFTER_S = 600.0


def remove_stale_temporaries(location: str, *, older_than: float = STALE_AFTER_S) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a kill interrupted (`.iter_*.pt.*.tmp`, see
    Checkpoint.save) from a local checkpoint folder; returns them. Only files nobody has written to for
    `older_than` seconds go: a write in progress (another process on a shared volume, a pod that is still
    shutting down) keeps touching its file. An s3:// location has none: objects are put whole. Run before
    training writes its first checkpoint, by the one process that writes them."""
    store = Store(location)
    if store.s3 or not store.path.is_dir():
        return []
    now = time.time()
    stale = []
    for path in sorted(store.path.glob(".iter_*.pt.*.tmp")):
        try:
            if now - path.stat().st_mtime >= older_than:
                path.unlink()
                stale.append(path)
        except FileNotFoundError:  # finished (renamed) or removed meanwhile
            continue
    return stale


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
