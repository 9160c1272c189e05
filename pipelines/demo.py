"""`spade pipeline demo` (what `make demo` runs): the whole training pipeline, locally, on the built-in landscapes.

1. the built-in landscapes (params.yaml `builtin:`) into data.root, and the small segmenter (params.yaml
   `segmenter:`) fitted on them when its weights (pseudolabel.weights) are missing;
2. their photos, without labels, packed into an archive: an unlabeled photo collection like a Flickr one;
3. the pipeline under kfp.local: fetch the archive -> pseudo-label the photos with the small segmenter ->
   train (params.yaml `train:`) -> evaluate on the real label maps -> package and register past the gate.
"""

import json
import sys
import tarfile
import time
from pathlib import Path

from pipelines.training import PIPELINE_NAME, load_params, run_local

PHOTOS_ARCHIVE = "builtin-photos.tar.gz"
LABELED_ARCHIVE = "builtin.tar.gz"


def _say(text: str) -> None:
    print(text, flush=True)


def pack(root: Path, archive: Path, *, photos_only: bool) -> Path:
    """Pack the data set (photos_only: just its photos as train/ and val/) into a tar.gz, unless it is up to date."""
    marker = root / "dataset.json"
    if archive.is_file() and marker.is_file() and archive.stat().st_mtime >= marker.stat().st_mtime:
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    part = archive.with_name(archive.name + ".part")
    with tarfile.open(part, "w:gz", compresslevel=1) as tar:
        if photos_only:
            for split in ("train", "val"):
                folder = root / f"{split}_img"
                for photo in sorted(folder.iterdir()) if folder.is_dir() else []:
                    tar.add(photo, arcname=f"photos/{split}/{photo.name}")
        else:
            tar.add(root, arcname="dataset")
    part.replace(archive)
    return archive


def run_demo(
    params_path: Path | None,
    overrides: list[str],
    *,
    pipeline_root: Path = Path("runs/pipeline"),
    work: Path = Path("data/demo"),
    labeled: bool = False,
) -> dict:
    from spade.evaluate.segmenters.small import train_small_segmenter
    from spade.local_runs import builtin_dataset

    start = time.perf_counter()
    params = load_params(params_path, overrides)
    data_root = Path((params.get("data") or {}).get("root") or "data/builtin")
    seg_cfg = params.get("segmenter") or {}
    pl_cfg = params.get("pseudolabel") or {}
    weights = Path(pl_cfg.get("weights") or seg_cfg.get("out") or "runs/segmenter/small_segmenter.pt")

    _say(f"[1/3] built-in landscapes -> {data_root}")
    builtin_dataset(params.get("builtin"), data_root)
    if weights.is_file():
        _say(f"      small segmenter: {weights}")
    else:
        iterations = int(seg_cfg.get("iterations", 600))
        _say(f"      small segmenter: fitting {iterations} iterations -> {weights}")
        train_small_segmenter(
            data_root,
            weights,
            size=int(seg_cfg.get("size", 64)),
            iterations=iterations,
            batch_size=int(seg_cfg.get("batch_size", 16)),
            seed=int(seg_cfg.get("seed", 0)),
        )

    archive = work / (LABELED_ARCHIVE if labeled else PHOTOS_ARCHIVE)
    what = "the labeled data set" if labeled else "its photos, without labels,"
    _say(f"[2/3] {what} -> {pack(data_root, archive, photos_only=not labeled)}")

    _say(f"[3/3] the training pipeline (kfp.local) -> {pipeline_root}/")
    arguments = {
        "source": str(archive),
        "params": params,
        "segmenter": "small",
        "segmenter_weights": str(weights),
        "eval_segmenter": "small",
        "eval_segmenter_weights": str(weights),
        "eval_data": str(data_root),  # the real label maps of the val split
    }
    run_local(arguments, params=params, pipeline_root=pipeline_root)
    summary = print_summary(pipeline_root, params)
    _say(f"\ndone in {(time.perf_counter() - start) / 60:.1f} min")
    return summary


def latest_run(pipeline_root: str | Path) -> Path | None:
    runs = sorted(Path(pipeline_root).glob(f"{PIPELINE_NAME}-*"), key=lambda p: p.name)
    return runs[-1] if runs else None


def _executor_output(run: Path, task: str) -> dict:
    path = run / task / "executor_output.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _artifact(output: dict, name: str) -> dict:
    items = ((output.get("artifacts") or {}).get(name) or {}).get("artifacts") or [{}]
    return items[0]


def print_summary(pipeline_root: str | Path, params: dict) -> dict:
    """What the latest local run produced: model, metrics, MLflow run, registered version, archive paths."""
    from components.runtime import checkpoint_path
    from spade.config import TrackingConfig
    from spade.train.tracking import resolve_tracking_uri

    run = latest_run(pipeline_root)
    if run is None:
        _say(f"no pipeline run under {pipeline_root}")
        return {}
    trained = _executor_output(run, "train")
    scored = _executor_output(run, "evaluate")
    registered = _executor_output(run, "package-and-register")
    model = _artifact(trained, "model")
    archive = _artifact(registered, "archive")
    decision = _artifact(registered, "decision")
    values = registered.get("parameterValues") or {}
    run_id = (trained.get("parameterValues") or {}).get("run_id") or ""
    tracking = dict(params.get("tracking") or {})
    uri = resolve_tracking_uri(TrackingConfig(tracking_uri=str(tracking.get("tracking_uri") or "")))
    summary = {
        "run": str(run.resolve()),
        "checkpoint": str(checkpoint_path(model.get("uri", ""), model.get("metadata"))),
        "metrics": (scored.get("parameterValues") or {}),
        "mlflow_run_id": run_id,
        "tracking_uri": uri,
        "model_name": values.get("model_name"),
        "version": values.get("version"),
        "decision": values.get("outcome"),
        "reason": (decision.get("metadata") or {}).get("reason"),
        "mar": str(Path(archive.get("uri", "")) / (archive.get("metadata") or {}).get("mar", "")),
        "kserve": str(Path(archive.get("uri", "")) / "kserve"),
        "stored_archive": values.get("archive_uri"),
        "decision_file": decision.get("uri"),
    }
    m = summary["metrics"]

    def fmt(key: str) -> str:
        value = m.get(key)
        return "n/a" if not isinstance(value, (int, float)) or not value >= 0 else f"{value:.4f}"

    _say("")
    _say(f"pipeline run:           {run.resolve()}")
    _say(f"model checkpoint:       {summary['checkpoint']}")
    _say(f"evaluation:             mIoU {fmt('miou')}, accuracy {fmt('accuracy')}, FID {fmt('fid')}")
    evaluation = _artifact(scored, "evaluation").get("uri")
    if evaluation and (Path(evaluation) / "samples.png").is_file():
        summary["samples"] = str(Path(evaluation) / "samples.png")
        _say(f"samples (label | real | synthesized): {summary['samples']}")
    if run_id:
        _say(f"MLflow run:             {run_id} ({uri})")
    _say(f"registered model:       {summary['model_name']} version {summary['version']}: {summary['decision']}")
    if summary["reason"]:
        _say(f"                        {summary['reason']}")
    _say(f"model archive (.mar):   {summary['mar']}")
    _say(f"KServe storage layout:  {summary['kserve']}/")
    _say(f"stored archive:         {summary['stored_archive']}")
    _say(f"decision:               {summary['decision_file']}")
    if uri.startswith("sqlite:"):
        _say(f"browse: .venv/bin/mlflow ui --backend-store-uri {uri}   # then open http://127.0.0.1:5000")
    _say(f"paint:  .venv/bin/spade studio --checkpoint {summary['checkpoint']}   # the GauGAN painter in a browser")
    sys.stdout.flush()
    return summary
