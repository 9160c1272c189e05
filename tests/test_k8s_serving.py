"""The KServe InferenceService manifest (k8s/base) agrees with what `spade package` writes."""

from __future__ import annotations

from spade.serve.package import ServingOptions, kserve_config_properties
from test_k8s import objects


def rendered() -> list[dict]:
    """The InferenceServices of k8s/base, as test_k8s renders it (kubectl kustomize, once)."""
    return objects("base", "InferenceService")


def test_inference_service_runs_our_image_with_torchserve_as_a_custom_container():
    [isvc] = rendered()
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert "model" not in predictor  # no built-in KServe runtime
    [container] = predictor["containers"]
    assert container["name"] == "kserve-container" and container["image"].startswith("spade")
    assert container["command"] == ["torchserve"]
    args = container["args"]
    assert "--foreground" in args
    assert "--ts-config=/mnt/models/config/config.properties" in args
    assert "--model-store=/mnt/models/model-store" in args
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["STORAGE_URI"].endswith("/kserve")  # the folder `spade package` writes


def test_container_port_matches_the_packaged_torchserve_config():
    [isvc] = rendered()
    [container] = isvc["spec"]["predictor"]["containers"]
    props = dict(
        line.split("=", 1) for line in kserve_config_properties("m", "1", ServingOptions()).splitlines() if "=" in line
    )
    assert props["inference_address"] == f"http://0.0.0.0:{container['ports'][0]['containerPort']}"
    assert props["model_store"] == "/mnt/models/model-store"
    assert container["readinessProbe"]["httpGet"]["port"] == container["ports"][0]["containerPort"]
    assert props["disable_token_authorization"] == "true"  # the probe and the mesh reach /ping without a key
