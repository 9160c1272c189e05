"""Kubeflow Trainer: the TrainJob that runs `spade train` on N nodes x G GPUs, and waiting for it.

`build_trainjob` is a pure function (the manifest as a dict); `run_trainjob` creates the job through a
CustomObjectsApi-like object, follows its conditions, and raises `TrainJobFailed` with the job's reason.
The `torch-distributed` runtime starts one pod per node with the PET_* variables (nnodes, node rank,
master address) that torchrun reads, so the command is `torchrun -m spade train ...`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
DEFAULT_RUNTIME = "torch-distributed"
GPU_RESOURCE = "nvidia.com/gpu"
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class TrainJobFailed(RuntimeError):
    """The TrainJob ended in Failed (or did not end in time); the message carries its reason."""


def job_name(prefix: str, unique: str) -> str:
    """A DNS-1035 name (lowercase, <= 63 characters, starting with a letter) from a prefix and a unique part."""
    text = re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{unique}".lower()).strip("-")
    if not text or not text[0].isalpha():
        text = f"t-{text}"
    return text[:63].rstrip("-")


def train_command(params_file: str) -> list[str]:
    """`spade train` under torchrun on every node; the params file holds every setting of the run."""
    return ["torchrun", "-m", "spade", "train", "--params", params_file]


def build_trainjob(
    name: str,
    namespace: str,
    image: str,
    num_nodes: int,
    gpus_per_node: int,
    params_file: str,
    *,
    runtime: str = DEFAULT_RUNTIME,
    cpu: str = "",
    memory: str = "",
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict] | None = None,
    pvc_name: str = "",
    mount_path: str = "/workspace",
    env: dict[str, str] | None = None,
    secret_env: dict[str, list[str]] | None = None,
    service_account: str = "",
    labels: dict[str, str] | None = None,
) -> dict:
    """The TrainJob manifest: `spade train --params PARAMS_FILE` under torchrun on every node.

    `secret_env` maps a Secret's name to the keys it exposes as environment variables (e.g. MLflow and
    S3 credentials); `pvc_name` mounts a (ReadWriteMany) claim at `mount_path` on every node, where
    the data, the params file and the outputs are.
    """
    if num_nodes < 1 or gpus_per_node < 0:
        raise ValueError(f"num_nodes must be >= 1 and gpus_per_node >= 0, got {num_nodes} and {gpus_per_node}")
    limits: dict[str, str | int] = {}
    requests: dict[str, str | int] = {}
    if gpus_per_node:
        limits[GPU_RESOURCE] = gpus_per_node
        requests[GPU_RESOURCE] = gpus_per_node
    if cpu:
        requests["cpu"] = cpu
    if memory:
        requests["memory"] = memory
        limits["memory"] = memory
    env_list = [{"name": k, "value": str(v)} for k, v in sorted((env or {}).items())]
    for secret, keys in sorted((secret_env or {}).items()):
        env_list += [{"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": k}}} for k in keys]
    trainer: dict = {
        "image": image,
        "command": train_command(params_file),
        "numNodes": num_nodes,
        "numProcPerNode": gpus_per_node or 1,
    }
    if limits or requests:
        trainer["resourcesPerNode"] = {k: v for k, v in (("limits", limits), ("requests", requests)) if v}
    if env_list:
        trainer["env"] = env_list
    spec: dict = {
        "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": runtime},
        "trainer": trainer,
    }
    # Trainer v2.2+ customises the runtime's pods with runtimePatches (a patch of the runtime's JobSet
    # template; it replaced podTemplateOverrides): here the `node` job's pod and its `node` container.
    pod: dict = {}
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod["tolerations"] = [dict(t) for t in tolerations]
    if service_account:
        pod["serviceAccountName"] = service_account
    # torchrun's workers share tensors through /dev/shm, which is 64 MiB in a container by default
    pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if pvc_name:
        pod["volumes"].append({"name": "workspace", "persistentVolumeClaim": {"claimName": pvc_name}})
        mounts.append({"name": "workspace", "mountPath": mount_path})
    pod["containers"] = [{"name": "node", "volumeMounts": mounts}]
    job_template = {"spec": {"template": {"spec": pod}}}
    spec["runtimePatches"] = [
        {
            "manager": "spade.components",
            "trainingRuntimeSpec": {
                "template": {"spec": {"replicatedJobs": [{"name": "node", "template": job_template}]}}
            },
        }
    ]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "spade", "app.kubernetes.io/component": "train", **(labels or {})},
        },
        "spec": spec,
    }


def current_namespace(default: str = "default") -> str:
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as f:
            return f.read().strip() or default
    except OSError:
        return default


def custom_objects_api():  # noqa: ANN201
    """A CustomObjectsApi on the in-cluster service account, else on ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def condition(job: dict, kind: str) -> dict | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and str(cond.get("status")) == "True":
            return cond
    return None


def describe(job: dict) -> str:
    conds = (job.get("status") or {}).get("conditions") or []
    parts = [f"{c.get('type')}={c.get('status')}" + (f" ({c.get('reason')})" if c.get("reason") else "") for c in conds]
    jobs = [
        f"{j.get('name')}: active {j.get('active', 0)}, ready {j.get('ready', 0)}, "
        f"succeeded {j.get('succeeded', 0)}, failed {j.get('failed', 0)}"
        for j in (job.get("status") or {}).get("jobsStatus") or []
    ]
    return "; ".join(parts + jobs) or "pending"


def run_trainjob(
    api,  # noqa: ANN001  (kubernetes.client.CustomObjectsApi or a stand-in)
    manifest: dict,
    *,
    poll_s: float = 10.0,
    timeout_s: float = 7 * 24 * 3600,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Create the TrainJob, print its status whenever it changes, return the finished job; raise on failure.

    A job that does not finish within `timeout_s` is deleted (its pods with it) before the error.
    """
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    trainer = manifest["spec"]["trainer"]
    log(f"created TrainJob {namespace}/{name}: {trainer['numNodes']} node(s) x {trainer['numProcPerNode']} process(es)")
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        text = describe(job)
        if text != last:
            log(f"TrainJob {name}: {text}")
            last = text
        failed = condition(job, "Failed")
        if failed is not None:
            reason = failed.get("reason") or "Failed"
            raise TrainJobFailed(f"TrainJob {namespace}/{name} failed: {reason}: {failed.get('message') or ''}".strip())
        if condition(job, "Complete") is not None:
            log(f"TrainJob {name} completed")
            return job
        if time.monotonic() > deadline:
            api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            raise TrainJobFailed(f"TrainJob {namespace}/{name} did not finish within {timeout_s:.0f} s (deleted)")
        sleep(poll_s)
