"""Stage 3: train SPADE: in this process (mode "local") or as a Kubeflow Trainer TrainJob (mode "cluster")."""

from typing import NamedTuple

from kfp.dsl import Dataset, Input, Model, Output

from components import spade_component


@spade_component
def train(
    dataset: Input[Dataset],
    model: Output[Model],
    params: dict,
    mode: str = "local",
    image: str = "",
    namespace: str = "",
    num_nodes: int = 1,
    gpus_per_node: int = 1,
    cpu: str = "",
    memory: str = "",
    node_selector: dict = {},  # noqa: B006  (KFP parameter defaults are constants)
    tolerations: list = [],  # noqa: B006
    workspace_pvc: str = "",
    workspace_mount: str = "/workspace",
    secret_env: dict = {},  # noqa: B006  {secret name: [keys]} exposed to the TrainJob's nodes
    service_account: str = "",
    poll_seconds: float = 15.0,
    timeout_seconds: float = 604800.0,
) -> NamedTuple("TrainOutputs", run_id=str, iterations=int):
    """`params` is params.yaml as a dict; the data root and output folder are the artifacts'.

    Cluster mode needs `workspace_pvc`, a ReadWriteMany claim mounted here and on the TrainJob's nodes; `image`
    defaults to this component's image ($SPADE_IMAGE).
    """
    import collections
    from pathlib import Path

    from components import IMAGE, runtime
    from spade.errors import SpadeError

    data_root = runtime.dataset_root(dataset.path, dataset.metadata)
    layout = dataset.metadata.get("layout", "")
    if mode == "local":
        final, run_id, iterations = runtime.train_local(params, data_root=data_root, layout=layout, out_dir=model.path)
    elif mode == "cluster":
        final, run_id, iterations = runtime.train_cluster(
            params,
            data_root=data_root,
            layout=layout,
            out_dir=Path(model.path),
            image=image or IMAGE,
            namespace=namespace,
            num_nodes=num_nodes,
            gpus_per_node=gpus_per_node,
            cpu=cpu,
            memory=memory,
            node_selector=node_selector,
            tolerations=tolerations,
            pvc_name=workspace_pvc,
            mount_path=workspace_mount,
            secret_env=secret_env,
            service_account=service_account,
            poll_s=poll_seconds,
            timeout_s=timeout_seconds,
        )
    else:
        raise SpadeError(f"mode must be local or cluster, got {mode!r}")
    model.metadata.update(
        {
            runtime.CHECKPOINT_KEY: str(Path(final).relative_to(model.path)),
            "mlflow_run_id": run_id,
            "iterations": iterations,
            "mode": mode,
            "dataset_fingerprint": dataset.metadata.get("fingerprint", ""),
        }
    )
    print(f"trained {iterations} iterations: {final}" + (f"; MLflow run {run_id}" if run_id else ""))
    return collections.namedtuple("TrainOutputs", ["run_id", "iterations"])(run_id, iterations)
