"""Stage 4: score the trained model (mIoU and accuracy by a segmenter, FID) into Metrics and metrics.json."""

from typing import NamedTuple

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components import spade_component


@spade_component
def evaluate(
    model: Input[Model],
    dataset: Input[Dataset],
    metrics: Output[Metrics],
    evaluation: Output[Artifact],
    params: dict,
    segmenter: str = "small",
    segmenter_weights: str = "runs/segmenter/small_segmenter.pt",
    data: str = "",
    split: str = "val",
    fid: bool = False,
    inception_weights: str = "",
    num_samples: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    precision: str = "auto",
    seed: int = 0,
) -> NamedTuple("EvaluationOutputs", fid=float, miou=float, accuracy=float):
    """spade.evaluate.evaluation.evaluate on `data` (a folder with ground truth), else on the training dataset.

    `evaluation` holds metrics.json (what the promotion gate reads) and the sample grid. A value not measured is
    returned as -1 (JSON has no NaN, and the KFP backend reads the outputs as JSON).
    """
    import collections
    import math
    from pathlib import Path

    from components import runtime
    from spade.config import DataConfig, TrackingConfig
    from spade.evaluate.evaluation import evaluate as run_evaluation

    root = Path(data) if data else runtime.dataset_root(dataset.path, dataset.metadata)
    layout = dataset.metadata.get("layout", "custom") if not data else "custom"
    data_section = runtime.section(params, "data")
    tracking = runtime.section(params, "tracking")
    result = run_evaluation(
        Path(model.path) / model.metadata.get("checkpoint", "final.pt"),
        DataConfig(
            layout=layout if layout != "photos" else "custom",
            root=str(root),
            split=runtime.evaluation_split(root, split),
            load_size=int(data_section.get("load_size", 286)),
            preprocess_mode=str(data_section.get("preprocess_mode", "resize_and_crop")),
        ),
        segmenter=segmenter,
        segmenter_weights=segmenter_weights,
        inception_weights=inception_weights or None,
        fid=fid,
        num_samples=num_samples,
        batch_size=batch_size,
        device=runtime.device(device),
        precision=precision,
        out_dir=evaluation.path,
        seed=seed,
        tracking=TrackingConfig(
            tracking_uri=str(tracking.get("tracking_uri", "")),
            experiment=str(tracking.get("experiment", "spade")),
            enabled=bool(tracking.get("enabled", True)),
        ),
        progress=False,
    )
    values = result.metrics
    missing = -1.0  # not measured

    def number(key: str) -> float:
        value = values.get(key)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else missing

    for key in ("fid", "mIoU", "accuracy"):
        if number(key) != missing:
            metrics.log_metric(key, number(key))
    evaluation.metadata.update({"metrics_file": "metrics.json", "mlflow_run_id": result.mlflow_run_id or ""})
    print(f"metrics: {', '.join(f'{k} {number(k):.4f}' for k in ('fid', 'mIoU', 'accuracy'))}")
    outputs = collections.namedtuple("EvaluationOutputs", ["fid", "miou", "accuracy"])
    return outputs(number("fid"), number("mIoU"), number("accuracy"))
