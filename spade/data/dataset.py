"""The training / evaluation dataset: checked samples read into class ids, instance ids and images."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from spade.config import DataConfig, ModelConfig
from spade.data.layouts import Sample, describe_problems, find_pairs
from spade.data.transforms import plan, transform_ids, transform_image
from spade.errors import SpadeError
from spade.images import open_image
from spade.labels import read_id_map, to_class_ids
from spade.progress import progress_bar


def read_photo(path: Path) -> Image.Image:
    """A photo fully decoded as RGB (a truncated or too large file raises SpadeError)."""
    with open_image(path, what="image") as img:
        return img.convert("RGB")


def _check(sample: Sample, cfg: ModelConfig) -> list[str]:
    problems = []
    label_shape = None
    try:
        raw = read_id_map(sample.label, "label map")
        label_shape = raw.shape
        to_class_ids(raw, cfg, source=str(sample.label))
    except SpadeError as exc:
        problems.append(str(exc))
    try:
        w, h = read_photo(sample.image).size
        if label_shape is not None and (h, w) != label_shape:
            problems.append(
                f"{sample.image}: image is {w}x{h} but its label map {sample.label.name} is "
                f"{label_shape[1]}x{label_shape[0]}; they must have the same size"
            )
    except SpadeError as exc:
        problems.append(str(exc))
    if sample.instance is not None and cfg.use_instance:
        try:
            inst = read_id_map(sample.instance, "instance map")
            if label_shape is not None and inst.shape != label_shape:
                problems.append(
                    f"{sample.instance}: instance map is {inst.shape[1]}x{inst.shape[0]} but its label map "
                    f"{sample.label.name} is {label_shape[1]}x{label_shape[0]}; they must have the same size"
                )
        except SpadeError as exc:
            problems.append(str(exc))
    return problems


def check_samples(
    samples: list[Sample], cfg: ModelConfig, *, skip_bad: bool, progress: bool = True
) -> tuple[list[Sample], list[str]]:
    """Decode every file once and check label values, readability and sizes.

    Returns the good samples and the problems ("path: reason"). Without `skip_bad`, any
    problem raises one SpadeError listing them. Instance maps are only read when the
    model uses instances.
    """
    good: list[Sample] = []
    problems: list[str] = []
    workers = min(16, 2 * (os.cpu_count() or 1))
    with (
        ThreadPoolExecutor(workers) as pool,
        progress_bar(total=len(samples), desc="checking data", unit="sample", disable=not progress) as bar,
    ):
        for sample, found in zip(samples, pool.map(lambda s: _check(s, cfg), samples), strict=True):
            if found:
                problems.extend(found)
            else:
                good.append(sample)
            bar.update()
    if problems and not skip_bad:
        bad = len(samples) - len(good)
        raise SpadeError(
            describe_problems(
                f"{bad} of {len(samples)} sample(s) cannot be used by the {cfg.preset} model:",
                problems,
                "Fix or remove these files, or set data.skip_bad=true to leave them out.",
            )
        )
    if not good and samples:
        raise SpadeError(describe_problems(f"none of the {len(samples)} sample(s) can be used:", problems))
    return good, problems


class SegmentationDataset(Dataset):
    """Samples as dicts: label (1, H, W) int64 class ids, instance (1, H, W) int64, image (3, H, W) in [-1, 1], name.

    Without an instance map (or when the model does not use instances), `instance` is a
    copy of the class ids, so instance edges fall on class boundaries. Training applies
    random crops and flips drawn from torch's RNG; evaluation is deterministic.
    """

    def __init__(self, samples: list[Sample], model_cfg: ModelConfig, data_cfg: DataConfig, *, train: bool) -> None:
        self.samples = list(samples)
        self.model_cfg = model_cfg
        self.data_cfg = data_cfg
        self.train = train
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        cfg = self.model_cfg
        ids = to_class_ids(read_id_map(sample.label, "label map"), cfg, source=str(sample.label))
        use_inst = sample.instance is not None and cfg.use_instance
        inst = read_id_map(sample.instance, "instance map") if use_inst else None
        photo = read_photo(sample.image)
        geo = plan((ids.shape[1], ids.shape[0]), cfg, self.data_cfg, train=self.train)
        label = torch.from_numpy(transform_ids(ids, geo)).unsqueeze(0)
        instance = label.clone() if inst is None else torch.from_numpy(transform_ids(inst, geo)).unsqueeze(0)
        rgb = torch.from_numpy(transform_image(photo, geo)).permute(2, 0, 1)
        image = rgb.to(torch.float32).div_(127.5).sub_(1.0).contiguous()
        return {"label": label, "instance": instance, "image": image, "name": sample.name}


def build_dataset(
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    *,
    train: bool,
    progress: bool = True,
    skipped_log: str | Path | None = None,
) -> SegmentationDataset:
    """Find, check and wrap the samples of `data_cfg`.

    With data.skip_bad, unpaired and unreadable files are left out: one line on stderr
    gives their count, `dataset.skipped` lists them, and `skipped_log` (if given) gets
    the list, one per line.
    """
    skipped: list[str] = []
    samples = find_pairs(data_cfg, problems=skipped)
    samples, bad = check_samples(samples, model_cfg, skip_bad=data_cfg.skip_bad, progress=progress)
    skipped.extend(bad)
    dataset = SegmentationDataset(samples, model_cfg, data_cfg, train=train)
    dataset.skipped = skipped
    if skipped:
        where = f"dataset.skipped (first: {skipped[0]})"
        if skipped_log is not None:
            log = Path(skipped_log)
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("".join(f"{p}\n" for p in skipped))
            where = str(log)
        print(
            f"data: skipped {len(skipped)} bad or unpaired file(s) under {data_cfg.root} (data.skip_bad=true), "
            f"kept {len(samples)} sample(s); the list is in {where}",
            file=sys.stderr,
        )
    return dataset
