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
    """spade.evaluate.evaluation.evaluate on `data` (ground truth: a folder, or an archive, URL or s3:// URI that
    is fetched as the fetch stage fetches), else on the training dataset.

    `evaluation` holds metrics.json (what the promotion gate reads) and the sample grid. A value not measured is
    returned as -1 (JSON has no NaN, and the KFP backend reads the outputs as JSON).
    """
    import collections
    import math
    from pathlib import Path

    from components import runtime
    from spade.config import LAYOUTS, DataConfig
    from spade.evaluate.evaluation import evaluate as run_evaluation

    settings = runtime.settings(params)
    if data and not Path(data).is_dir():  # an archive, http(s):// or s3://: fetched into a temporary folder
        import tempfile

        from spade.data.fetch import fetch_dataset

        fetched = fetch_dataset(data, Path(tempfile.mkdtemp(prefix="eval-data-")) / "data")
        root, layout = Path(fetched.path), fetched.layout
    elif data:  # a folder of ground truth in the custom layout
        root, layout = Path(data), "custom"
    else:
        root, layout = runtime.dataset_root(dataset.path, dataset.metadata), dataset.metadata.get("layout", "")
    result = run_evaluation(
        runtime.checkpoint_path(model.path, model.metadata),
        DataConfig(  # the split's own folders, read as the training stage reads them
            layout=layout if layout in LAYOUTS else "custom",
            root=str(root),
            split=runtime.evaluation_split(root, split),
            load_size=settings.data.load_size,
            preprocess_mode=settings.data.preprocess_mode,
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
        tracking=settings.tracking,
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
