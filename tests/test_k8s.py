"""The Kubernetes manifests (k8s/base, k8s/overlays/{dev,prod}) render with kustomize and validate offline.

Built-in kinds go through kubernetes-validate's strict schemas for the pinned Kubernetes version (unknown
fields rejected, like `kubectl apply --validate=strict`); the custom resources (Kubeflow Trainer's TrainJob,
KServe's InferenceService) through the schemas vendored in tests/fixtures/crds/ (see generate.py there), whose
embedded Kubernetes types resolve in the same kubernetes-validate definitions. On top of that: the project's
policies (limits and probes everywhere, placeholder-only Secrets, namespaced least-privilege RBAC) and the
references between objects (Secrets, ConfigMaps, PVCs, service accounts, Service selectors).
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRDS = Path(__file__).resolve().parent / "fixtures" / "crds"
K8S_VERSION = "1.32"
NAMESPACE = "spade"
TREES = ["base", "overlays/dev", "overlays/prod"]
CRD_SCHEMAS = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainjob.trainer.kubeflow.org.v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.serving.kserve.io.v1beta1.json",
}
POD_KINDS = {"Deployment", "StatefulSet", "Job"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
PLACEHOLDER = "CHANGE_ME"


@functools.cache
def render(tree: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the manifests (kubectl kustomize)"
    out = subprocess.run([kubectl, "kustomize", str(K8S / tree)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def objects(tree: str, kind: str) -> list[dict]:
    return [doc for doc in render(tree) if doc["kind"] == kind]


def one(tree: str, kind: str, name: str) -> dict:
    [doc] = [doc for doc in objects(tree, kind) if doc["metadata"]["name"] == name]
    return doc


# --- validation ---------------------------------------------------------------------------------------------


@functools.cache
def k8s_definitions() -> referencing.Resource:
    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"
    return referencing.Resource.from_contents(json.loads((folder / "_definitions.json").read_text()))


@functools.cache
def crd_validator(filename: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((CRDS / filename).read_text())
    registry = referencing.Registry().with_resource("https://kubernetes.io/api/_definitions.json", k8s_definitions())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validation_errors(doc: dict) -> list[str]:
    """Schema errors of one object: [] when valid."""
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    crd = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if crd is not None:
        errors = sorted(crd_validator(crd).iter_errors(doc), key=lambda e: list(e.absolute_path))
        return [f"{where} {'.'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errors]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where} {'.'.join(map(str, e.path))}: {e.message[:300]}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{where}: {e.message}"]  # an unknown kind is an error, not a pass
    return []


@pytest.mark.parametrize("tree", TREES)
def test_every_manifest_validates_against_its_schema(tree):
    docs = render(tree)
    assert docs
    errors = [err for doc in docs for err in validation_errors(doc)]
    assert not errors, "\n".join(errors)


def _set(doc: dict, path: str, value) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()
PATCH = "spec.runtimePatches.0.trainingRuntimeSpec.template.spec.replicatedJobs.0.template.spec.template.spec"
BROKEN = {
    "deployment unknown container field": (
        "Deployment",
        "mlflow",
        "spec.template.spec.containers.0.imagePullPolicyy",
        "Always",
    ),
    "deployment unknown spec field": ("Deployment", "torchserve", "spec.replica", 2),
    "deployment without selector": ("Deployment", "mlflow", "spec.selector", _DELETE),
    "deployment replicas as string": ("Deployment", "mlflow", "spec.replicas", "2"),
    "service port as string": ("Service", "mlflow", "spec.ports.0.port", "5000"),
    "hpa unknown target field": (
        "HorizontalPodAutoscaler",
        "torchserve",
        "spec.metrics.0.resource.target.utilization",
        70,
    ),
    "role rule unknown field": ("Role", "spade-pipeline", "rules.0.verb", ["get"]),
    "trainjob suspend as string": ("TrainJob", "spade-train", "spec.suspend", "true"),
    "trainjob numNodes as string": ("TrainJob", "spade-train", "spec.trainer.numNodes", "2"),
    "trainjob unknown trainer field": ("TrainJob", "spade-train", "spec.trainer.gpus", 8),
    "trainjob without runtimeRef": ("TrainJob", "spade-train", "spec.runtimeRef", _DELETE),
    "trainjob runtimeRef without name": ("TrainJob", "spade-train", "spec.runtimeRef.name", _DELETE),
    "trainjob podTemplateOverrides (removed in v2.2)": ("TrainJob", "spade-train", "spec.podTemplateOverrides", []),
    "trainjob patch unknown pod field": ("TrainJob", "spade-train", f"{PATCH}.nodeSelectr", {"a": "b"}),
    "trainjob patch bad toleration": ("TrainJob", "spade-train", f"{PATCH}.tolerations.0.tolerationSeconds", "x"),
    "trainjob env bad secretKeyRef": ("TrainJob", "spade-train", "spec.trainer.env.2.valueFrom.secretKeyRef.keyy", "k"),
    "isvc unknown predictor field": ("InferenceService", "spade", "spec.predictor.replicas", 2),
    "isvc container unknown field": ("InferenceService", "spade", "spec.predictor.containers.0.commands", ["x"]),
    "isvc minReplicas as string": ("InferenceService", "spade", "spec.predictor.minReplicas", "1"),
    "isvc container without name": ("InferenceService", "spade", "spec.predictor.containers.0.name", _DELETE),
    "isvc probe port as list": (
        "InferenceService",
        "spade",
        "spec.predictor.containers.0.readinessProbe.httpGet.port",
        [1],
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validator_rejects_a_broken_manifest(case):
    kind, name, path, value = BROKEN[case]
    good = one("overlays/dev", kind, name)
    assert validation_errors(good) == []
    errors = validation_errors(_set(good, path, value))
    assert errors, f"{case}: accepted"
    # reported where the damage is: at the field itself, or at its parent for unknown/missing fields
    location = errors[0].split(" ", 1)[1].split(":", 1)[0]
    assert path.startswith(location) and location.count(".") >= path.count(".") - 1, errors


def test_an_unknown_kind_is_an_error():
    assert validation_errors({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "x"}})


# --- policy -------------------------------------------------------------------------------------------------


def pod_specs(tree: str):
    """(owner, pod spec) of every workload, the InferenceService predictor included."""
    for doc in render(tree):
        if doc["kind"] in POD_KINDS:
            yield doc, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "InferenceService":
            yield doc, doc["spec"]["predictor"]


@pytest.mark.parametrize("tree", TREES)
def test_every_container_has_requests_limits_and_long_running_ones_probes(tree):
    seen = 0
    for owner, spec in pod_specs(tree):
        for c in spec.get("initContainers", []) + spec["containers"]:
            seen += 1
            where = f"{owner['kind']}/{owner['metadata']['name']}/{c['name']}"
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(part, {})), f"{where}: {part}"
            if owner["kind"] != "Job" and c in spec["containers"]:
                assert "readinessProbe" in c and "livenessProbe" in c, f"{where}: probes"
            assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False or owner["kind"] == (
                "InferenceService"
            ), where
    assert seen >= 4
    for job in objects(tree, "TrainJob"):
        per_node = job["spec"]["trainer"]["resourcesPerNode"]
        assert {"cpu", "memory", "nvidia.com/gpu"} <= set(per_node["limits"])
        assert int(per_node["limits"]["nvidia.com/gpu"]) >= 1


@pytest.mark.parametrize("tree", TREES)
def test_secrets_hold_placeholders_only(tree):
    secrets = objects(tree, "Secret")
    assert secrets
    for secret in secrets:
        assert "data" not in secret, f"{secret['metadata']['name']}: base64 data (use stringData placeholders)"
        for key, value in secret["stringData"].items():
            assert PLACEHOLDER in value, f"Secret {secret['metadata']['name']}.{key} is not a placeholder"
    # and no credential is written straight into an environment variable
    for _, spec in pod_specs(tree):
        for c in spec.get("initContainers", []) + spec["containers"]:
            for env in c.get("env", []):
                if any(word in env["name"] for word in ("PASSWORD", "SECRET", "ACCESS_KEY")):
                    assert "valueFrom" in env, f"{c['name']}: {env['name']} inline"


ALLOWED_RULES = {
    ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "list", "watch", "delete"},
    ("serving.kserve.io", "inferenceservices"): {"create", "get", "list", "watch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get", "list", "watch"},
}


@pytest.mark.parametrize("tree", TREES)
def test_rbac_is_namespaced_and_limited_to_what_the_pipeline_needs(tree):
    kinds = {doc["kind"] for doc in render(tree)}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    [role] = objects(tree, "Role")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, rule  # no resourceNames/nonResourceURLs tricks
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == ALLOWED_RULES
    [binding] = objects(tree, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "spade-pipeline"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "spade-pipeline", "namespace": NAMESPACE}]


@pytest.mark.parametrize("tree", TREES)
def test_everything_lives_in_the_namespace(tree):
    [ns] = objects(tree, "Namespace")
    assert ns["metadata"]["name"] == NAMESPACE
    for doc in render(tree):
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("tree", TREES)
def test_references_between_objects_resolve(tree):
    docs = render(tree)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    keys = {
        (d["kind"], d["metadata"]["name"]): set(d.get("data", {})) | set(d.get("stringData", {}))
        for d in docs
        if d["kind"] in ("Secret", "ConfigMap")
    }
    claims = set()
    for d in docs:
        if d["kind"] == "StatefulSet":
            claims |= {t["metadata"]["name"] for t in d["spec"].get("volumeClaimTemplates", [])}

    def check_env(where, containers):
        for c in containers:
            for env in c.get("env", []):
                for kind, ref in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    if sel := env.get("valueFrom", {}).get(ref):
                        assert sel["key"] in keys.get((kind, sel["name"]), set()), f"{where}: {kind} {sel}"
            for src in c.get("envFrom", []):
                for kind, ref in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                    if ref in src:
                        assert (kind, src[ref]["name"]) in names, f"{where}: {kind} {src[ref]['name']}"

    def check_pod(where, spec):
        if sa := spec.get("serviceAccountName"):
            assert ("ServiceAccount", sa) in names, f"{where}: service account {sa}"
        for vol in spec.get("volumes", []):
            if pvc := vol.get("persistentVolumeClaim"):
                assert ("PersistentVolumeClaim", pvc["claimName"]) in names, f"{where}: pvc {pvc['claimName']}"
        mounted = {v["name"] for v in spec.get("volumes", [])} | claims
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            for m in c.get("volumeMounts", []):
                assert m["name"] in mounted, f"{where}/{c['name']}: volume {m['name']}"
        check_env(where, spec.get("initContainers", []) + spec.get("containers", []))

    for owner, spec in pod_specs(tree):
        check_pod(f"{owner['kind']}/{owner['metadata']['name']}", spec)
    for job in objects(tree, "TrainJob"):
        check_env("TrainJob", [job["spec"]["trainer"]])
        for patch in job["spec"]["runtimePatches"]:
            for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                check_pod("TrainJob patch", rj["template"]["spec"]["template"]["spec"])
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for svc in objects(tree, "Service"):
        selector = svc["spec"]["selector"].items()
        matching = [w for w in workloads if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert matching, f"Service {svc['metadata']['name']} selects no pods"
        ports = {p["name"] for w in matching for c in w["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {svc['metadata']['name']}: {port['targetPort']}"
    for hpa in objects(tree, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) in names
    for sa in objects(tree, "ServiceAccount"):
        for secret in sa.get("secrets", []):
            assert ("Secret", secret["name"]) in names


# --- what each environment contains -------------------------------------------------------------------------


def test_dev_runs_minio_and_postgres_in_cluster():
    tree = "overlays/dev"
    minio = one(tree, "Deployment", "minio")
    assert minio["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "minio"
    one(tree, "Service", "minio")
    one(tree, "PersistentVolumeClaim", "minio")
    buckets = one(tree, "Job", "minio-buckets")
    script = buckets["spec"]["template"]["spec"]["containers"][0]["args"][0]
    for bucket in ("spade-mlflow", "spade-models"):
        assert "local/$bucket" in script and bucket in script
    postgres = one(tree, "StatefulSet", "postgres")
    assert postgres["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    one(tree, "Service", "postgres")
    config = one(tree, "ConfigMap", "spade-config")["data"]
    assert config["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "@postgres:5432/" in one(tree, "Secret", "mlflow-db")["stringData"]["uri"]
    assert mlflow_container(tree)["resources"]["limits"]["memory"] == "1Gi"  # small


def test_prod_has_no_in_cluster_storage_and_a_released_image():
    tree = "overlays/prod"
    names = {doc["metadata"]["name"] for doc in render(tree)}
    assert not {"minio", "minio-buckets", "postgres"} & names
    assert "@postgres:5432/" not in one(tree, "Secret", "mlflow-db")["stringData"]["uri"]  # external database
    images = {c["image"] for _, spec in pod_specs(tree) for c in spec["containers"]}
    images.add(one(tree, "TrainJob", "spade-train")["spec"]["trainer"]["image"])
    assert images == {"registry.example.com/spade:0.1.0"}
    for name in ("mlflow", "torchserve"):
        assert (
            one(tree, "Deployment", name)["spec"]["replicas"]
            > one("overlays/dev", "Deployment", name)["spec"]["replicas"]
        )
    assert one(tree, "HorizontalPodAutoscaler", "torchserve")["spec"]["minReplicas"] >= 2


def mlflow_container(tree: str) -> dict:
    [c] = one(tree, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("tree", TREES)
def test_mlflow_serves_s3_artifacts_from_a_database_backend(tree):
    c = mlflow_container(tree)
    assert c["command"] == ["mlflow"] and c["args"][0] == "server"
    args = dict(a.split("=", 1) for a in c["args"][1:] if "=" in a)
    assert "--serve-artifacts" in c["args"]
    assert args["--backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "uri"}
    config = one(tree, "ConfigMap", "spade-config")["data"]
    assert args["--artifacts-destination"] == "$(MLFLOW_ARTIFACTS_DESTINATION)"
    assert config["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert one(tree, "Secret", "mlflow-db")["stringData"]["uri"].startswith("postgresql://")
    assert one(tree, "Service", "mlflow")["spec"]["ports"][0]["port"] == 5000
    assert config["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


@pytest.mark.parametrize("tree", TREES)
def test_trainjob_runs_spade_train_on_gpu_nodes_with_shared_memory(tree):
    job = one(tree, "TrainJob", "spade-train")
    spec = job["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed"}
    assert spec["suspend"] is True  # applying the stack starts no GPUs
    trainer = spec["trainer"]
    assert trainer["command"][:4] == ["torchrun", "-m", "spade", "train"] and "--params" in trainer["args"]
    assert isinstance(trainer["numNodes"], int) and trainer["numNodes"] >= 1
    env = {e["name"]: e for e in trainer["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "spade-s3"
    assert "MLFLOW_TRACKING_URI" in env and "AWS_ENDPOINT_URL" in env
    [patch] = spec["runtimePatches"]
    [node] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"  # the torch-distributed runtime's trainer job
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    volumes = {v["name"]: v for v in pod["volumes"]}
    [container] = pod["containers"]
    assert container["name"] == "node"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "persistentVolumeClaim" in volumes[mounts["/app/data"]]


def test_prod_trains_on_more_gpus_than_dev():
    def gpus(tree):
        trainer = one(tree, "TrainJob", "spade-train")["spec"]["trainer"]
        return trainer["numNodes"] * int(trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"])

    assert gpus("overlays/prod") > gpus("overlays/dev") >= 1


@pytest.mark.parametrize("tree", TREES)
def test_torchserve_deployment_autoscales_and_probes_ping(tree):
    deployment = one(tree, "Deployment", "torchserve")
    pod = deployment["spec"]["template"]["spec"]
    [ts] = pod["containers"]
    assert ts["command"] == ["torchserve"]
    assert "--ts-config=/mnt/models/config/config.properties" in ts["args"]
    assert "--model-store=/mnt/models/model-store" in ts["args"]
    assert ts["readinessProbe"]["httpGet"]["path"] == "/ping"
    [fetch] = pod["initContainers"]
    assert fetch["env"][0]["value"].endswith("/kserve")  # the folder `spade package` writes
    hpa = one(tree, "HorizontalPodAutoscaler", "torchserve")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "torchserve"}
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # the management API (8081) stays inside the pod
    assert {p["port"] for p in one(tree, "Service", "torchserve")["spec"]["ports"]} == {8080, 8082}
