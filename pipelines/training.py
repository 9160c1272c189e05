"""The training pipeline: fetch -> pseudo-label (unlabeled photos only) -> train -> evaluate -> package & register.

Parameters mirror params.yaml: `params` is the whole file (its defaults are read from params.yaml when the
pipeline is built), and the stage settings the pipeline acts on (pseudolabel:, evaluate:, package:) are
parameters of their own, defaulting to the file's values. `make_pipeline(params, cluster=...)` builds the
pipeline; with `ClusterOptions` the tasks get the Kubernetes settings (kfp-kubernetes): the workspace PVC
the TrainJob shares, secrets as environment variables, GPU node selectors and tolerations. Every task runs
the project image `make_pipeline(..., image=...)` names (and a cluster-mode train task's TrainJob too).
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from kfp import dsl, kubernetes

from components import IMAGE
from components.deploy import deploy, keep_serving
from components.evaluate import evaluate
from components.fetch_dataset import fetch_dataset, use_labeled_dataset
from components.package_and_register import package_and_register
from components.pseudolabel import pseudolabel
from components.train import train

PIPELINE_NAME = "spade-training"
PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"
DEFAULT_SOURCE = "data/builtin"
COMPONENT_NAMES = ("fetch-dataset", "pseudolabel", "train", "evaluate", "package-and-register")


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """params.yaml (PATH, else ./params.yaml, else the repository's, else {}) with 'section.key=value' overrides."""
    from spade.config import apply_overrides, load_params, params_path

    path = params_path(path) or (PARAMS_FILE if PARAMS_FILE.is_file() else None)
    return apply_overrides(load_params(path), overrides or [])


@dataclass
class ClusterOptions:
    """Kubernetes settings of the tasks in a cluster (kfp-kubernetes); the TrainJob gets the same claim and secrets.

    secrets: {secret name: [keys]}; each key becomes an environment variable of that name (MLflow, S3, Flickr).
    node_selector / tolerations: where the GPU tasks (evaluate, pseudolabel and the TrainJob's nodes) run.
    tolerations: dicts with key, operator ("Equal" / "Exists"), value and effect.
    """

    pvc_name: str = ""
    mount_path: str = "/workspace"
    secrets: dict[str, list[str]] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)
    task_gpus: int = 1  # GPUs of the evaluate and pseudolabel tasks (0: CPU)


def _apply_cluster(task: dsl.PipelineTask, cluster: ClusterOptions, *, gpu: bool = False, pvc: bool = False) -> None:
    for secret, keys in cluster.secrets.items():
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={k: k for k in keys})
    if pvc and cluster.pvc_name:
        kubernetes.mount_pvc(task, pvc_name=cluster.pvc_name, mount_path=cluster.mount_path)
    if gpu and cluster.task_gpus:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(cluster.task_gpus)
        for label, value in cluster.node_selector.items():
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        for tol in cluster.tolerations:
            kubernetes.add_toleration(
                task,
                key=tol.get("key"),
                operator=tol.get("operator", "Equal" if tol.get("value") else "Exists"),
                value=tol.get("value"),
                effect=tol.get("effect"),
                toleration_seconds=tol.get("tolerationSeconds"),
            )


def make_pipeline(params: dict | None = None, cluster: ClusterOptions | None = None, *, image: str = ""):  # noqa: ANN201
    """The pipeline function, its defaults taken from `params` (params.yaml's content; default: the file).

    `image` is the project image of every task (default: components.IMAGE, $SPADE_IMAGE or the published one).
    """
    params = load_params() if params is None else params
    fe = dict(params.get("fetch") or {})
    pl = dict(params.get("pseudolabel") or {})
    ev = dict(params.get("evaluate") or {})
    pkg = dict(params.get("package") or {})
    reg = dict(params.get("register") or {})
    dep = dict(params.get("deploy") or {})
    mode_default = "cluster" if cluster is not None else "local"
    image = image or IMAGE
    opts = cluster or ClusterOptions()

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="SPADE training: fetch, pseudo-label unlabeled photos, train, evaluate, package and register "
        "past the promotion gate.",
    )
    def training_pipeline(
        source: str = DEFAULT_SOURCE,
        source_sha256: str = "",
        dataset_layout: str = "auto",
        params: dict = params,
        mode: str = mode_default,
        segmenter: str = str(pl.get("segmenter", "small")),
        segmenter_weights: str = str(pl.get("weights", "runs/segmenter/small_segmenter.pt")),
        min_confidence: float = float(pl.get("min_confidence", 0.0)),
        pseudolabel_batch_size: int = int(pl.get("batch_size", 8)),
        eval_data: str = "",
        eval_split: str = str(ev.get("split", "val")),
        eval_segmenter: str = str(ev.get("segmenter", pl.get("segmenter", "small"))),
        eval_segmenter_weights: str = str(
            ev.get("segmenter_weights", pl.get("weights", "runs/segmenter/small_segmenter.pt"))
        ),
        fid: bool = bool(ev.get("fid", False)),
        inception_weights: str = "",
        eval_num_samples: int = int(ev.get("num_samples", 0)),
        eval_precision: str = str(ev.get("precision", "auto")),
        model_name: str = str(reg.get("model_name") or pkg.get("name") or "spade"),
        model_version: str = "",
        force_promotion: bool = False,
        num_nodes: int = 1,
        gpus_per_node: int = 1,
        namespace: str = "",
    ) -> None:
        fetch = fetch_dataset(
            source=source,
            sha256=source_sha256,
            layout=dataset_layout,
            max_bytes=str(fe.get("max_bytes", "100G")),
            max_entries=int(fe.get("max_entries", 1_000_000)),
            max_ratio=float(fe.get("max_ratio", 100.0)),
        )
        fetch.set_display_name("fetch dataset").set_caching_options(False)

        with dsl.If(fetch.outputs["needs_labels"] == True, name="unlabeled-photos"):  # noqa: E712
            labelled = pseudolabel(
                photos=fetch.outputs["dataset"],
                segmenter=segmenter,
                segmenter_weights=segmenter_weights,
                min_confidence=min_confidence,
                batch_size=pseudolabel_batch_size,
            )
            labelled.set_display_name("pseudo-label photos")
        with dsl.Else(name="labeled"):
            as_is = use_labeled_dataset(fetched=fetch.outputs["dataset"])
            as_is.set_display_name("labeled dataset as is")
        dataset = dsl.OneOf(labelled.outputs["dataset"], as_is.outputs["dataset"])

        trained = train(
            dataset=dataset,
            params=params,
            mode=mode,
            image=image,
            namespace=namespace,
            num_nodes=num_nodes,
            gpus_per_node=gpus_per_node,
            node_selector=dict(opts.node_selector),
            tolerations=list(opts.tolerations),
            workspace_pvc=opts.pvc_name,
            workspace_mount=opts.mount_path,
            secret_env={k: list(v) for k, v in opts.secrets.items()},
        )
        trained.set_display_name("train")

        scored = evaluate(
            model=trained.outputs["model"],
            dataset=dataset,
            params=params,
            segmenter=eval_segmenter,
            segmenter_weights=eval_segmenter_weights,
            data=eval_data,
            split=eval_split,
            fid=fid,
            inception_weights=inception_weights,
            num_samples=eval_num_samples,
            precision=eval_precision,
        )
        scored.set_display_name("evaluate")

        registered = package_and_register(
            model=trained.outputs["model"],
            evaluation=scored.outputs["evaluation"],
            params=params,
            model_name=model_name,
            version=model_version,
            run_id=trained.outputs["run_id"],
            force=force_promotion,
        )
        registered.set_display_name("package and register").set_caching_options(False)

        deployed = kept = None
        if dep.get("torchserve_url"):  # the endpoint settings decide when the pipeline is built
            # If / Else (not a lone If): both branches are visible in the run, and kfp.local evaluates a
            # condition on a task's output only inside such a branch group
            with dsl.If(registered.outputs["promoted"] == True, name="promoted"):  # noqa: E712
                deployed = deploy(
                    archive=registered.outputs["archive"],
                    torchserve_url=str(dep["torchserve_url"]),
                    model_store=str(dep.get("model_store") or ""),
                    archive_url=str(dep.get("archive_url") or ""),
                    inference_url=str(dep.get("inference_url") or ""),
                    workers=int(dep.get("workers", 1)),
                    timeout=float(dep.get("timeout", 300)),
                    drain=float(dep.get("drain", 5)),
                )
                deployed.set_display_name("deploy").set_caching_options(False)
            with dsl.Else(name="not-promoted"):
                kept = keep_serving(
                    outcome=registered.outputs["outcome"],
                    model_name=registered.outputs["model_name"],
                    version=registered.outputs["version"],
                )
                kept.set_display_name("champion keeps serving").set_caching_options(False)

        for task in (fetch, labelled, as_is, trained, scored, registered, *(t for t in (deployed, kept) if t)):
            task.container_spec.image = image  # the image this pipeline was built for
        if cluster is not None:
            _apply_cluster(fetch, cluster)
            _apply_cluster(labelled, cluster, gpu=True)
            _apply_cluster(as_is, cluster)
            _apply_cluster(trained, cluster, pvc=True)
            _apply_cluster(scored, cluster, gpu=True)
            _apply_cluster(registered, cluster)
            for task in (deployed, kept):
                if task is not None:
                    _apply_cluster(task, cluster)

    return training_pipeline


def compile_pipeline(
    out: str | Path, params: dict | None = None, cluster: ClusterOptions | None = None, *, image: str = ""
) -> Path:
    """Write the pipeline's IR YAML to `out` (see make_pipeline)."""
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(make_pipeline(params, cluster, image=image), str(out))
    return out


def run_local(
    arguments: dict,
    *,
    params: dict | None = None,
    pipeline_root: str | Path = "runs/pipeline",
    runner: str = "subprocess",
    image: str = "",
    env: dict[str, str] | None = None,
) -> dict:
    """Run the pipeline here with kfp.local; returns its outputs.

    runner "subprocess": each task a subprocess of this Python (no pip installs). runner "docker": each task a
    container of `image` (kfp.local.DockerRunner), as the image's own user, on the host network, with `env`
    as its environment; the pipeline root is mounted into each at the same path.
    """
    import warnings

    from kfp import local

    _local_oneof_artifacts()
    # display names are a UI matter, and under the subprocess runner the project image is this environment
    warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    umask = None
    if runner == "docker":
        # the tasks run as the image's user: the folders kfp.local makes for them must be theirs to write
        pipeline_root.chmod(0o777)
        umask = os.umask(0)
        backend = local.DockerRunner(network_mode="host", environment={"PYTHONUNBUFFERED": "1", **(env or {})})
    elif runner == "subprocess":
        backend = local.SubprocessRunner(use_venv=False)
    else:
        raise ValueError(f"runner {runner!r}: expected 'subprocess' or 'docker'")
    local.init(runner=backend, pipeline_root=str(pipeline_root))
    pipeline = make_pipeline(params, image=image)
    try:
        task = pipeline(**arguments)
    except RuntimeError as exc:  # kfp.local: "Pipeline ... finished with status FAILURE. Inner task failed: ..."
        from spade.errors import SpadeError

        raise SpadeError(f"{exc} (its log is above; artifacts under {pipeline_root})") from None
    finally:
        if umask is not None:
            os.umask(umask)
    return dict(getattr(task, "outputs", {}) or {})


def _local_oneof_artifacts() -> None:
    """Let kfp.local resolve `dsl.OneOf` over artifacts (kfp 2.17 does it for parameters only).

    The KFP backend takes the artifact of the branch that ran; kfp.local refuses a DAG output with more than
    one artifact selector. This wraps its resolver to do what the backend does; idempotent.
    """
    from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils

    original = OrchestratorUtils.get_dag_output_artifacts.__func__
    if getattr(original, "_spade_oneof", False):
        return

    def get_dag_output_artifacts(cls, dag_outputs_spec, io_store):  # noqa: ANN001, ANN202
        outputs = {}
        for key, spec in dag_outputs_spec.artifacts.items():
            found = []
            for selector in spec.artifact_selectors:
                try:
                    found.append(io_store.get_task_output(selector.producer_subtask, selector.output_artifact_key))
                except (KeyError, ValueError):
                    continue  # a branch that did not run
            if len(found) != 1:
                raise ValueError(
                    f"dsl.OneOf output {key!r}: expected the artifact of exactly one branch, got {len(found)}"
                )
            outputs[key] = found[0]
        return outputs

    get_dag_output_artifacts._spade_oneof = True
    OrchestratorUtils.get_dag_output_artifacts = classmethod(get_dag_output_artifacts)
