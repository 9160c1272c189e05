from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TESTS = Path(__file__).parent
SHARED = TESTS.parent.parent / "shared"
sys.path.insert(0, str(TESTS))


def shared_path(*parts: str) -> Path | None:
    p = SHARED.joinpath(*parts)
    return p if p.exists() else None


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which CPU ran the numerics (tolerances come from error bounds, but `auto` picks bf16 only where it is
    native), and, once, that the shared COCO-Stuff sample is absent and generated data stands in for it."""
    from spade.precision import describe_cpu

    lines = [f"cpu: {describe_cpu()}"]
    if shared_path("data", "coco_stuff_sample") is None:
        lines.append(
            f"shared data: {SHARED / 'data' / 'coco_stuff_sample'} is absent; tests use a generated sample "
            "in the COCO-Stuff layout (and the vendored spec files) instead"
        )
    return lines


def make_coco_stuff_sample(root: Path, *, n_val: int = 3, size: tuple[int, int] = (96, 72), seed: int = 0) -> Path:
    """A small dataset in the COCO-Stuff layout: {val}_img/*.jpg, _label/*.png (uint8 ids, 255 unlabeled),
    _inst/*.png (instance ids); regions are blocks of stuff/thing classes, like the real maps."""
    rng = np.random.default_rng(seed)
    w, h = size
    for split in ("val",):
        for sub in ("img", "label", "inst"):
            (root / f"{split}_{sub}").mkdir(parents=True, exist_ok=True)
        for i in range(n_val):
            stem = f"{i + 1:012d}"
            label = np.full((h, w), rng.integers(91, 182), np.uint8)
            inst = np.zeros((h, w), np.uint8)
            for k in range(4):
                y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
                label[y : y + rng.integers(5, 30), x : x + rng.integers(5, 30)] = rng.integers(0, 91)
                inst[y : y + 8, x : x + 8] = k + 1
            label[:3, :3] = 255
            Image.fromarray(label).save(root / f"{split}_label" / f"{stem}.png")
            Image.fromarray(inst).save(root / f"{split}_inst" / f"{stem}.png")
            img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / f"{split}_img" / f"{stem}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def coco_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real COCO-Stuff sample from ../shared when present, else a generated one in the same layout."""
    real = shared_path("data", "coco_stuff_sample")
    if real is not None:
        return real
    return make_coco_stuff_sample(tmp_path_factory.mktemp("coco_stuff_sample"))


@pytest.fixture(scope="session")
def spec() -> dict:
    from official_states import SPEC_FILE

    data = json.loads(SPEC_FILE.read_text())
    shared = shared_path("spec", "official_spade_checkpoints.json")
    if shared is not None:  # the vendored copy must not drift from the project's spec
        assert json.loads(shared.read_text()) == data
    return data
