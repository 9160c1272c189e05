"""Glue the components import at run time (inside their function bodies): artifact folders <-> spade calls.

Kept out of the component functions so that each stays a few lines, and testable without kfp.
Nothing here holds business logic: that is in `spade`.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spade.config import Settings

DATASET_ROOT_KEY = "root"  # artifact metadata: the dataset's folder relative to the artifact path ("": itself)
CHECKPOINT_KEY = "checkpoint"  # artifact metadata: the final checkpoint relative to the model artifact path
FINAL_CHECKPOINT = "final.pt"  # what `spade train` writes last in its out_dir
SPLITS = ("train", "val")
# where MLflow and the object store are: passed on from the train task to the TrainJob's nodes
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def dataset_root(path: str, metadata: dict | None) -> Path:
    """The dataset folder of a Dataset artifact (its path, or a sub-folder its metadata names)."""
    sub = (metadata or {}).get(DATASET_ROOT_KEY) or ""
    return Path(path) / sub if sub else Path(path)


def checkpoint_path(path: str, metadata: dict | None) -> Path:
    """The final checkpoint of a Model artifact written by the train component."""
    return Path(path) / ((metadata or {}).get(CHECKPOINT_KEY) or FINAL_CHECKPOINT)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def link_tree(src: str | Path, dst: str | Path) -> Path:
    """Copy a folder (hard links where the file system allows, else copies); symlinks are followed."""
    src, dst = Path(src), Path(dst)

    def copy(a: str, b: str) -> None:
        try:
            os.link(os.path.realpath(a), b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=copy, dirs_exist_ok=True)
    return dst


def device(name: str) -> str:
    from spade.devices import resolve_device

    return str(resolve_device(name))


# --------------------------------------------------------------------------- settings


def plain_numbers(value):  # noqa: ANN001, ANN201
    """KFP passes dict parameters as JSON (protobuf Struct), so 8 arrives as 8.0: integral floats back to ints."""
    if isinstance(value, dict):
        return {k: plain_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_numbers(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def raw_params(params: dict | None) -> dict:
    """params.yaml as a dict (the pipeline's `params`), its numbers as params.yaml had them."""
    return plain_numbers(dict(params or {}))


def section(params: dict | None, name: str) -> dict:
    value = plain_numbers((params or {}).get(name) or {})
    return dict(value) if isinstance(value, dict) else {}


def settings(params: dict | None) -> Settings:
    """The typed Settings of the pipeline's `params`; a bad or unknown key is a SpadeError naming it."""
    from spade.config import Settings

    return Settings.from_dict(raw_params(params))


def train_settings(params: dict, *, data_root: str | Path, out_dir: str | Path, layout: str = "") -> Settings:
    """Settings of params.yaml for a training run on `data_root` writing to `out_dir`."""
    from spade.config import LAYOUTS, Settings

    raw = raw_params(params)
    data = section(raw, "data")
    data["root"] = str(data_root)
    if layout in LAYOUTS:
        data["layout"] = layout
    train = section(raw, "train")
    train["out_dir"] = str(out_dir)
    train.pop("checkpoint_dir", None)  # checkpoints go with the run's output
    raw["data"], raw["train"] = data, train
    return Settings.from_dict(raw)


def checkpoint_run_id(checkpoint: str | Path) -> str:
    from spade.checkpoints import Checkpoint

    return str(Checkpoint.load(checkpoint).meta.get("mlflow_run_id") or "")


# --------------------------------------------------------------------------- stages


def train_local(params: dict, *, data_root: Path, layout: str, out_dir: Path) -> tuple[Path, str, int]:
    """Train in this process (kfp.local): (final model, MLflow run id, iterations)."""
    from spade.errors import SpadeError
    from spade.train.loop import train

    # train.vgg_loss as the params say: missing VGG19 weights stop the run (the trainer names the file and
    # the setting), they never turn the loss off behind the user's back
    cfg = train_settings(params, data_root=data_root, out_dir=out_dir, layout=layout)
    say(f"training {cfg.train.iterations} iterations on {data_root} -> {out_dir}")
    result = train(cfg, resume="")
    if result.stopped_by_signal or result.final_model is None:
        raise SpadeError(f"training stopped at iteration {result.iteration} before the end")
    return Path(result.final_model), result.run_id or "", result.iteration


def photo_folders(root: Path) -> dict[str, Path]:
    """The photo folders of a `photos` dataset by split: ROOT/train and ROOT/val when present, else all of ROOT."""
    found = {split: root / split for split in SPLITS if (root / split).is_dir()}
    return found or {"train": root}


def pseudolabel_photos(
    photos: Path,
    out: Path,
    *,
    segmenter: str,
    weights: str,
    min_confidence: float,
    batch_size: int,
    device_name: str,
) -> list[dict]:
    from spade.evaluate.segmenters import load_segmenter
    from spade.pseudolabel import pseudolabel

    seg = load_segmenter(segmenter, weights, device=device(device_name))
    reports = []
    for split, folder in photo_folders(photos).items():
        report = pseudolabel(
            folder,
            out,
            seg,
            batch_size=batch_size,
            min_confidence=min_confidence,
            split=split,
            link_images=False,  # an artifact must hold its files, not links into another artifact
            recursive=True,
        )
        say(report.summary())
        reports.append({"split": split, **report.to_dict()})
    return reports


def evaluation_split(root: Path, wanted: str) -> str:
    """`wanted`, checked: a dataset without that split is an error that says what to do, never a silent
    evaluation on the other split (the training labels would flatter the model)."""
    from spade.errors import SpadeError

    if (root / f"{wanted}_label").is_dir() or wanted not in SPLITS:
        return wanted
    other = [s for s in SPLITS if s != wanted and (root / f"{s}_label").is_dir()]
    if other:
        raise SpadeError(
            f"{root} has no {wanted} split to evaluate on (a pseudo-labelled photo collection has only {other[0]}): "
            f"give the pipeline eval_data (real label maps), or set evaluate.split: {other[0]} (eval_split) to score "
            "against those labels; the split is recorded in metrics.json and on the MLflow run"
        )
    return wanted


def train_cluster(
    params: dict,
    *,
    data_root: Path,
    layout: str,
    out_dir: Path,
    image: str,
    namespace: str = "",
    num_nodes: int = 1,
    gpus_per_node: int = 1,
    cpu: str = "",
    memory: str = "",
    node_selector: dict | None = None,
    tolerations: list | None = None,
    pvc_name: str = "",
    mount_path: str = "/workspace",
    secret_env: dict | None = None,
    service_account: str = "",
    runtime: str = "",
    poll_s: float = 15.0,
    timeout_s: float = 7 * 24 * 3600,
    api=None,  # noqa: ANN001  (a CustomObjectsApi; default: the in-cluster one)
) -> tuple[Path, str, int]:
    """Train with a Kubeflow Trainer TrainJob on the shared workspace claim; copy its final model to `out_dir`."""
    import uuid

    import yaml

    from components import trainjob
    from spade.errors import SpadeError

    if not pvc_name:
        raise SpadeError("cluster training needs a workspace PVC (ReadWriteMany) shared with the TrainJob's nodes")
    name = trainjob.job_name("spade-train", f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    work = Path(mount_path) / "trainjobs" / name
    say(f"staging {data_root} -> {work / 'data'}")
    link_tree(data_root, work / "data")
    cfg = train_settings(params, data_root=work / "data", out_dir=work / "out", layout=layout)
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    forwarded = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    manifest = trainjob.build_trainjob(
        name,
        namespace or trainjob.current_namespace(),
        image,
        num_nodes,
        gpus_per_node,
        str(params_file),
        runtime=runtime or trainjob.DEFAULT_RUNTIME,
        cpu=cpu,
        memory=memory,
        node_selector=node_selector,
        tolerations=tolerations,
        pvc_name=pvc_name,
        mount_path=mount_path,
        env=forwarded,
        secret_env=secret_env,
        service_account=service_account,
        labels={"spade.dev/run": name},
    )
    trainjob.run_trainjob(api or trainjob.custom_objects_api(), manifest, poll_s=poll_s, timeout_s=timeout_s, log=say)
    final = work / "out" / FINAL_CHECKPOINT
    if not final.is_file():
        raise SpadeError(f"TrainJob {name} completed but wrote no {final}")
    link_tree(work / "out", out_dir)
    model = Path(out_dir) / FINAL_CHECKPOINT
    return model, checkpoint_run_id(model), cfg.train.iterations
