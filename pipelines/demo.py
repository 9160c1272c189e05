"""`spade pipeline demo` (what `make demo` runs): the whole training pipeline, locally, on the built-in landscapes.

1. the built-in landscapes (params.yaml `builtin:`) into data.root, and the small segmenter (params.yaml
   `segmenter:`) fitted on them when its weights (pseudolabel.weights) are missing;
2. their photos, without labels, packed into an archive: an unlabeled photo collection like a Flickr one;
3. the pipeline under kfp.local: fetch the archive -> pseudo-label the photos with the small segmenter ->
   train (params.yaml `train:`) -> evaluate on the real label maps -> package and register past the gate.
"""

import contextlib
import itertools
import json
import statistics
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from pipelines.training import PIPELINE_NAME, load_params, run_local

PHOTOS_ARCHIVE = "builtin-photos.tar.gz"
LABELED_ARCHIVE = "builtin.tar.gz"


# Starting a pipeline task's Python and its imports, and what a task does besides its main loop; measured
# on the demo's tasks (fetch, pseudolabel, train, evaluate, package-and-register) on 2 cores.
TASK_START_S = 3.0
PIPELINE_TASKS = 5


def _say(text: str) -> None:
    print(text, flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _seconds_per_call(call: Callable[[], object], calls: int = 3) -> float:
    """Median seconds of `calls` calls after one warm-up call."""
    call()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _vgg_setting(params: dict) -> None:
    """The demo's explicit choice: without the VGG19 weights on this machine (none can be downloaded), it
    trains with train.vgg_loss=false and says so; the setting travels to the pipeline and is logged on
    the MLflow run with the others. (The pipeline's train task itself never turns the loss off.)"""
    from spade.config import Settings
    from spade.local_runs import without_missing_vgg

    train = params.setdefault("train", {})
    if not train.get("vgg_loss", True):
        return
    if not without_missing_vgg(Settings.from_dict(params), note=lambda _: None).train.vgg_loss:
        _say("note: the VGG19 weights (vgg19-dcbb9e9d.pth) are not on this machine: the demo sets train.vgg_loss=false")
        train["vgg_loss"] = False


def estimate_seconds(params: dict, *, fit_segmenter: bool) -> dict[str, float]:
    """How long the demo's stages take on this machine: a few iterations of each stage's own networks,
    at its own sizes and batch, timed here and multiplied out. Keys: segmenter, pseudolabel, train,
    evaluate, other (task starts), total; seconds."""
    import torch
    import torch.nn.functional as F

    from spade.config import Settings
    from spade.evaluate.segmenters.small import DEFAULT_WIDTHS, SmallSegNet, _augmented_batch
    from spade.train.objective import step_for_timing

    settings = Settings.from_dict(params)
    mc, tc = settings.model, settings.train
    seg_cfg = params.get("segmenter") or {}
    builtin = params.get("builtin") or {}
    evaluate = params.get("evaluate") or {}
    g = torch.Generator().manual_seed(0)
    device = torch.device("cpu")
    out: dict[str, float] = {}

    size, seg_batch = int(seg_cfg.get("size", 64)), int(seg_cfg.get("batch_size", 16))
    segnet = SmallSegNet(mc.label_nc, DEFAULT_WIDTHS)
    if fit_segmenter:
        images = [(torch.rand(3, size, size, generator=g), torch.randint(mc.label_nc, (size, size))) for _ in range(4)]
        optimizer = torch.optim.AdamW(segnet.parameters())

        def segmenter_step() -> None:
            x, y = _augmented_batch(images, size, seg_batch, g)
            loss = F.cross_entropy(segnet(x), y, ignore_index=255)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        out["segmenter"] = _seconds_per_call(segmenter_step) * int(seg_cfg.get("iterations", 600))

    step = step_for_timing(mc, tc, device)
    h, w = mc.output_size
    batch = {
        "label": torch.randint(mc.label_nc, (tc.batch_size, 1, h, w), generator=g).float(),
        "image": torch.rand(tc.batch_size, 3, h, w, generator=g) * 2 - 1,
    }
    iteration = itertools.count()
    out["train"] = _seconds_per_call(lambda: step(batch, next(iteration)))
    out["train"] *= tc.iterations

    # pseudo-labelling and evaluation: the segmenter (and, evaluating, the generator) over every photo
    with torch.no_grad():
        segnet.eval()
        step.gside.eval()
        photos = torch.rand(8, 3, size, size, generator=g)
        per_photo = _seconds_per_call(lambda: segnet(photos)) / 8
        seg = step.objective.inputs(batch, device, step.channels_last)[0]
        per_image = _seconds_per_call(lambda: step.gside.generator(seg), calls=2) / tc.batch_size
    count, val_count = int(builtin.get("count", 300)), int(builtin.get("val_count") or 0)
    scored = int(evaluate.get("num_samples") or 0) or val_count
    out["pseudolabel"] = per_photo * (count + val_count)
    out["evaluate"] = (per_photo + per_image) * scored
    out["other"] = TASK_START_S * PIPELINE_TASKS
    out["total"] = sum(out.values())
    return out


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
    runner: str = "subprocess",
    image: str = "spade:dev",
    serve: bool = True,
) -> dict:
    """The demo (module docstring). runner "docker": every pipeline task in a container of `image`, against an
    object store, PostgreSQL and an MLflow server started for the run (pipelines.services, state under
    WORK/services); the inputs go to the object store and the tasks read them from there, as in a cluster.

    serve (the subprocess runner): a TorchServe on 127.0.0.1 is started first and the pipeline's deploy task
    puts the promoted model behind it; one label map is then sent to the endpoint and the answer saved as
    WORK/served.png, and the server is stopped (the command to keep one running is printed)."""
    from spade.evaluate.segmenters.small import train_small_segmenter
    from spade.local_runs import builtin_dataset

    start = time.perf_counter()
    params = load_params(params_path, overrides)
    _vgg_setting(params)
    data_root = Path((params.get("data") or {}).get("root") or "data/builtin")
    seg_cfg = params.get("segmenter") or {}
    pl_cfg = params.get("pseudolabel") or {}
    weights = Path(pl_cfg.get("weights") or seg_cfg.get("out") or "runs/segmenter/small_segmenter.pt")

    from spade.precision import describe_cpu

    fit = not weights.is_file()
    estimate = estimate_seconds(params, fit_segmenter=fit)
    _say(f"on this CPU ({describe_cpu()}) the demo should take about {_duration(estimate['total'])}")
    _say("(timed from a few iterations of each stage's networks here; stages below say theirs)")

    _say(f"[1/3] built-in landscapes -> {data_root}")
    builtin_dataset(params.get("builtin"), data_root)
    if not fit:
        _say(f"      small segmenter: {weights}")
    else:
        iterations = int(seg_cfg.get("iterations", 600))
        _say(
            f"      small segmenter: fitting {iterations} iterations (about {_duration(estimate['segmenter'])})"
            f" -> {weights}"
        )
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
    iterations = int((params.get("train") or {}).get("iterations", 0))
    _say(
        f"      fetch, pseudo-label (about {_duration(estimate['pseudolabel'])}), train {iterations} iterations"
        f" (about {_duration(estimate['train'])}), evaluate (about {_duration(estimate['evaluate'])}),"
        f" package and register; about {_duration(estimate['total'] - estimate.get('segmenter', 0.0))} in all"
    )
    arguments = {
        "source": str(archive),
        "params": params,
        "segmenter": "small",
        "segmenter_weights": str(weights),
        "eval_segmenter": "small",
        "eval_segmenter_weights": str(weights),
        "eval_data": str(data_root),  # the real label maps of the val split
    }
    if runner == "docker":
        summary = _run_in_containers(arguments, params, data_root, work, pipeline_root, image)
    elif not serve:
        run_local(arguments, params=params, pipeline_root=pipeline_root)
        summary = print_summary(pipeline_root, params)
    else:
        with _serving(work) as server:
            params = {**params, "deploy": _deploy_settings(server, work)}
            arguments["params"] = params
            run_local(arguments, params=params, pipeline_root=pipeline_root)
            summary = print_summary(pipeline_root, params)
            summary["served"] = _try_the_endpoint(server, summary, data_root, work)
    elapsed = time.perf_counter() - start
    _say(f"\ndone in {elapsed / 60:.1f} min (estimated {estimate['total'] / 60:.1f} min)")
    summary["elapsed_s"] = round(elapsed, 1)
    summary["estimated_s"] = {k: round(v, 1) for k, v in estimate.items()}
    return summary


SERVED_IMAGE = "served.png"


@contextlib.contextmanager
def _serving(work: Path):  # noqa: ANN202
    """A TorchServe on free 127.0.0.1 ports with an empty model store under WORK/serving, stopped afterwards."""
    import shutil

    from spade.errors import SpadeError
    from spade.serve.local_torchserve import LocalTorchServe

    if shutil.which("java") is None:
        raise SpadeError(
            "the demo serves its model with TorchServe, which needs Java 17: `make demo` installs it "
            "(scripts/provision-java.sh), or run `spade pipeline demo --no-serve`"
        )
    root = work / "serving"
    if root.exists():
        shutil.rmtree(root)
    store = root / "model-store"
    store.mkdir(parents=True)
    _say(f"      serving: starting TorchServe (model store {store}) for the pipeline's deploy task")
    with LocalTorchServe(store, token_auth=False, workdir=root / "torchserve") as server:
        yield server


def _deploy_settings(server, work: Path) -> dict:  # noqa: ANN001
    return {
        "torchserve_url": server.management_url,
        "model_store": str(server.model_store),
        "inference_url": server.inference_url,
        "drain": 1,
    }


def _try_the_endpoint(server, summary: dict, data_root: Path, work: Path) -> dict:  # noqa: ANN001
    """One label map of the val split to the deployed model; the answer saved as WORK/served.png."""
    import urllib.request

    from spade.errors import SpadeError

    name = summary.get("model_name") or "spade"
    if summary.get("decision") != "promoted":
        _say(f"served: nothing deployed ({name} version {summary.get('version')} was not promoted)")
        return {}
    label = sorted((data_root / "val_label").glob("*.png"))[0]
    url = f"{server.inference_url}/predictions/{name}"
    request = urllib.request.Request(url, data=label.read_bytes(), method="POST", headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            body = response.read()
    except OSError as exc:
        raise SpadeError(f"the deployed model did not answer at {url}: {exc}") from None
    out = work / SERVED_IMAGE
    out.write_bytes(body)
    mar = next(iter(sorted(server.model_store.glob("*.mar"))), None)
    _say(f"served:                 POST {label} to {url} -> {out} (the champion, live)")
    _say(
        "to keep an endpoint running:\n"
        f"  .venv/bin/torchserve --start --ncs --disable-token-auth --enable-model-api "
        f"--model-store {server.model_store} --models {name}={mar.name if mar else name + '.mar'}\n"
        f"  curl -H 'Content-Type: image/png' --data-binary @{label} http://127.0.0.1:8080/predictions/{name} "
        "-o photo.png    # (.venv/bin/torchserve --stop ends it)"
    )
    return {"url": url, "label": str(label), "image": str(out)}


def _run_in_containers(
    arguments: dict, params: dict, data_root: Path, work: Path, pipeline_root: Path, image: str
) -> dict:
    """The pipeline under kfp.local's DockerRunner, its inputs and outputs in the local object store."""
    import copy
    import subprocess

    from pipelines.services import local_services
    from spade.errors import SpadeError

    try:
        found = subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SpadeError("the docker runner needs Docker: make image installs and starts the engine") from None
    if found.returncode:
        why = found.stderr.strip().splitlines()[-1] if found.stderr.strip() else "not found"
        raise SpadeError(f"image {image}: {why}; build it with: make image (or pass --image)")

    labeled = pack(data_root, work / LABELED_ARCHIVE, photos_only=False)  # the evaluation's ground truth
    with local_services(work / "services", image=image, say=_say) as services:
        arguments = dict(arguments)
        arguments["source"] = services.upload(arguments["source"], "spade-data", Path(arguments["source"]).name)
        weights = services.upload(arguments["segmenter_weights"], "spade-data", "segmenter/small_segmenter.pt")
        arguments["segmenter_weights"] = arguments["eval_segmenter_weights"] = weights
        arguments["eval_data"] = services.upload(labeled, "spade-data", f"eval/{labeled.name}")
        params = copy.deepcopy(params)
        params.setdefault("tracking", {})["tracking_uri"] = services.mlflow_url
        # the package-and-register task's rule for the model name
        name = str(
            (params.get("register") or {}).get("model_name") or (params.get("package") or {}).get("name") or "spade"
        )
        params.setdefault("register", {})["store"] = f"s3://spade-models/{name}"
        arguments["params"] = params
        _say(f"      inputs in s3://spade-data/; each task a container of {image} (host network)")
        run_local(arguments, params=params, pipeline_root=pipeline_root, runner="docker", image=image, env=services.env)
        summary = print_summary(pipeline_root, params)
    summary["services"] = {"s3": services.s3_url, "mlflow": services.mlflow_url, "state": str(services.root)}
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
