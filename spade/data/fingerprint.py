"""Dataset fingerprints: one short hash of the files a run trained on, for lineage and caches."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def files_fingerprint(paths: Iterable[Path], root: Path | None = None) -> str:
    """sha256 over (relative name, content hash) of the files in sorted order: moving or copying the
    data keeps it, changing any byte or adding / removing a file changes it."""
    h = hashlib.sha256()
    entries = []
    for p in paths:
        p = Path(p)
        name = str(p.relative_to(root)) if root is not None and p.is_relative_to(root) else p.name
        entries.append((name, p))
    for name, p in sorted(entries):
        h.update(name.encode())
        h.update(b"\0")
        h.update(file_digest(p).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def samples_fingerprint(samples: Iterable) -> str:
    """Fingerprint of dataset samples (objects with label, image and optional instance paths).

    Names are taken as the dataset shows them (absolute, links not followed; the content is read through
    them): a folder of links to the files (DVC's symlink cache, `spade pseudolabel`'s linked photos) has the
    fingerprint of a plain copy."""
    paths = []
    for s in samples:
        paths += [Path(s.label).absolute(), Path(s.image).absolute()]
        if s.instance is not None:
            paths.append(Path(s.instance).absolute())
    root = Path(_common_root(paths)) if paths else None
    return files_fingerprint(paths, root)


def _common_root(paths: list[Path]) -> str:
    import os

    return os.path.commonpath([str(p.parent) for p in paths])
