"""`spade evaluate`: how well a checkpoint's images follow their label maps, and how real they look.

For every label map of the evaluation set the generator synthesizes an image; a
segmenter labels that image at the label map's own resolution and a confusion
matrix against the input label map gives mIoU and pixel accuracy (don't-care
pixels ignored). FID compares Inception features of the synthesized images with
those of the real photos (at the model's resolution; real statistics are cached
per dataset fingerprint). Results go to metrics.json, a sample grid, and MLflow,
with the precision the generator ran at ("auto" resolves per machine).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spade.config import DataConfig, TrackingConfig
from spade.errors import SpadeError
from spade.progress import progress_bar


@dataclass
class EvaluationResult:
    metrics: dict
    metrics_path: Path
    grid_path: Path
    mlflow_run_id: str | None


def _uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, as saved images are."""
    return ((images.float() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def evaluate(
    checkpoint: str | Path,
    data: DataConfig,
    *,
    segmenter: str,
    segmenter_weights: str | Path,
    inception_weights: str | Path | None = None,
    fid: bool = True,
    num_samples: int = 0,
    batch_size: int = 8,
    device: str = "cpu",
    precision: str = "auto",
    out_dir: str | Path = "evaluation",
    seed: int = 0,
    tracking: TrackingConfig | None = None,
    progress: bool = True,
) -> EvaluationResult:
    from spade.data.dataset import build_dataset
    from spade.data.fingerprint import file_digest, samples_fingerprint
    from spade.evaluate.segmentation_metrics import ConfusionMatrix
    from spade.evaluate.segmenters import load_segmenter
    from spade.labels import read_id_map, to_class_ids
    from spade.storage import is_s3
    from spade.synthesize import Synthesizer
    from spade.visualize import dataset_colours, sample_grid

    start = time.perf_counter()
    out_dir = Path(out_dir)
    synth = Synthesizer.from_file(checkpoint, device=device, precision=precision)
    cfg = synth.config
    # bf16 runs the generator and the segmenter under autocast; FID stays float32 (it is sensitive)
    bf16 = synth.precision == "bfloat16"
    seg = load_segmenter(segmenter, segmenter_weights, device=device, num_classes=cfg.label_nc, bf16=bf16)
    if seg.num_classes != cfg.label_nc:
        raise SpadeError(
            f"segmenter {segmenter} predicts {seg.num_classes} classes but the model uses {cfg.label_nc}: "
            "their class ids must be the same"
        )
    fid_state = _FID(inception_weights, device) if fid else None  # fails early on missing weights

    data = replace(data, max_samples=num_samples or data.max_samples)
    dataset = build_dataset(data, cfg, train=False, progress=progress)
    samples = dataset.samples
    if not samples:
        raise SpadeError(f"no evaluation samples under {data.root}")
    fingerprint = samples_fingerprint(samples)  # hashes every file: once, for the FID cache and metrics.json
    if fid_state is not None:
        fid_state.use_cache(f"{fingerprint}-{cfg.output_size[0]}x{cfg.output_size[1]}")
    confusion = ConfusionMatrix(cfg.label_nc, ignore_index=cfg.dontcare_id)
    grid_rows: dict[str, list] = {"label": [], "real": [], "fake": []}
    with progress_bar(total=len(samples), desc="evaluate", unit="img", disable=not progress) as bar:
        for start_i in range(0, len(samples), batch_size):
            idx = list(range(start_i, min(start_i + batch_size, len(samples))))
            items = [dataset[i] for i in idx]
            label = torch.stack([x["label"] for x in items])
            instance = torch.stack([x["instance"] for x in items]) if cfg.use_instance else None
            fakes = synth.synthesize(label, instance, seed=seed)
            fakes_u8 = _uint8(fakes)
            photos = []
            targets = []
            for i, fake in zip(idx, fakes_u8, strict=True):
                sample = samples[i]
                raw = to_class_ids(read_id_map(sample.label), cfg, source=str(sample.label))
                h, w = raw.shape
                photos.append(np.asarray(Image.fromarray(fake).resize((w, h), Image.BICUBIC)))
                targets.append(torch.from_numpy(raw))
            for result, target in zip(seg.segment(photos), targets, strict=True):
                confusion.update(torch.from_numpy(result.labels), target)
            if fid_state is not None:
                fid_state.add_fake(fakes)
                fid_state.add_real(torch.stack([x["image"] for x in items]))
            if len(grid_rows["label"]) < 8:
                take = 8 - len(grid_rows["label"])
                grid_rows["label"] += [x["label"] for x in items][:take]
                grid_rows["real"] += [x["image"] for x in items][:take]
                grid_rows["fake"] += list(fakes[:take])
            bar.update(len(idx))

    scores = confusion.as_dict(list(seg.class_names) if seg.class_names else None)
    metrics = {
        "mIoU": scores["mean_iou"],
        "accuracy": scores["pixel_accuracy"],
        "mean_class_accuracy": scores["mean_accuracy"],
    }
    if fid_state is not None:
        metrics["fid"] = fid_state.value()
    metrics["per_class_iou"] = {name: c["iou"] for name, c in scores["per_class"].items()}
    metrics["per_class"] = scores["per_class"]
    metrics["counts"] = {
        "images": len(samples),
        "valid_pixels": scores["valid_pixels"],
        "classes_present": scores["classes_present"],
        "ignore_index": scores["ignore_index"],
    }
    metrics["checkpoint"] = str(checkpoint)
    # what the numbers were measured on: the promotion gate compares only numbers of the same data
    metrics["data"] = {
        "fingerprint": fingerprint,
        "split": data.split,
        "layout": data.layout,
        "images": len(samples),
    }
    metrics["segmenter"] = segmenter
    # which weights: a refitted segmenter of the same name scores differently (a local file by its sha256)
    weights = Path(segmenter_weights) if segmenter_weights and not is_s3(str(segmenter_weights)) else None
    metrics["segmenter_weights"] = (
        f"sha256:{file_digest(weights)}" if weights is not None and weights.is_file() else str(segmenter_weights or "")
    )
    metrics["precision"] = synth.precision  # as resolved: "auto" depends on the machine, and so may the numbers
    metrics["seconds"] = round(time.perf_counter() - start, 2)

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    _write_json(metrics_path, metrics)
    matrix = confusion.matrix.cpu().numpy()
    np.savetxt(
        out_dir / "confusion_matrix.csv", matrix, fmt="%d", delimiter=",", header="rows: label, columns: prediction"
    )
    from spade.synthesize import save_png

    colours = dataset_colours(data.root, cfg.label_nc)
    grid = sample_grid(
        torch.stack(grid_rows["label"]),
        torch.stack(grid_rows["real"]),
        torch.stack(grid_rows["fake"]),
        cfg.label_nc,
        colours=colours,
    )
    grid_path = save_png(grid, out_dir / "samples.png")
    run_id = _log_to_mlflow(synth.checkpoint.meta, metrics, metrics_path, grid_path, tracking or TrackingConfig())
    return EvaluationResult(metrics, metrics_path, grid_path, run_id)


class _FID:
    """Inception statistics of synthesized and real images; the real ones are cached per dataset."""

    def __init__(self, weights: str | Path | None, device: str) -> None:
        from spade.evaluate.fid import FIDAccumulator, load_fid_inception

        self.model = load_fid_inception(weights, device=device)
        self.fake = FIDAccumulator(self.model, device=device)
        self.real: FIDAccumulator | None = FIDAccumulator(self.model, device=device)
        self.cached_real: tuple[np.ndarray, np.ndarray] | None = None
        self.cache_file: Path | None = None

    def use_cache(self, dataset_key: str) -> None:
        """Real statistics for this dataset (at the model's size) come from the cache when present."""
        from spade.evaluate.fid import default_cache_dir, load_statistics

        self.cache_file = default_cache_dir() / f"real-{dataset_key}-{self.model.weights_id}.npz"
        if self.cache_file.is_file():
            self.cached_real = load_statistics(self.cache_file)
            self.real = None

    def add_fake(self, images: torch.Tensor) -> None:
        self.fake.add_generated(images)

    def add_real(self, images: torch.Tensor) -> None:
        if self.real is not None:
            self.real.add_generated(images)

    def value(self) -> float:
        from spade.evaluate.fid import frechet_distance, save_statistics

        real = self.cached_real
        if real is None:
            real = self.real.statistics()
            if self.cache_file is not None:
                save_statistics(self.cache_file, *real)
        return float(frechet_distance(*self.fake.statistics(), *real))


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".metrics.", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, default=float)
        fh.write("\n")
    os.replace(tmp, path)


def _log_to_mlflow(meta: dict, metrics: dict, metrics_path: Path, grid_path: Path, cfg: TrackingConfig) -> str | None:
    """Log into the checkpoint's training run when it is known, else into a new evaluation run.

    The precision is a tag (`eval_precision`), not a param: params cannot change, and a training run may be
    evaluated again at another precision."""
    if not cfg.enabled:
        return None
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow.entities import Metric, RunTag
        from mlflow.tracking import MlflowClient

        from spade.train.tracking import resolve_tracking_uri

        uri = meta.get("mlflow_tracking_uri") or resolve_tracking_uri(cfg)
        client = MlflowClient(tracking_uri=uri)
        run_id = meta.get("mlflow_run_id")
        if run_id is None:
            exp = client.get_experiment_by_name(cfg.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment)
            run_id = client.create_run(exp_id, tags={"spade.stage": "evaluation"}).info.run_id
            client.set_terminated(run_id)
        stamp = int(time.time() * 1000)
        step = int(meta.get("iteration") or 0)
        scalars = {f"eval_{k}": float(v) for k, v in metrics.items() if k in ("mIoU", "accuracy", "fid")}
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, stamp, step) for k, v in scalars.items()],
            tags=[
                RunTag("eval_precision", metrics["precision"]),
                RunTag("eval_split", str(metrics["data"]["split"])),
                RunTag("eval_data_fingerprint", str(metrics["data"]["fingerprint"])),
                RunTag("eval_segmenter", str(metrics["segmenter"])),
            ],
        )
        client.log_artifact(run_id, str(metrics_path), "evaluation")
        client.log_artifact(run_id, str(grid_path), "evaluation")
        return run_id
    except Exception as exc:  # noqa: BLE001 - the metrics are on disk; tracking must not fail the stage
        print(f"warning: could not log the evaluation to MLflow ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None
