"""The training pipeline: its IR, `spade pipeline submit / schedule` against a fake KFP API server, the TrainJob
manifest, and a run end to end under kfp.local on a tiny built-in dataset."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.trainjob import build_trainjob
from pipeline_helpers import FakeKfpServer, pipeline_params, tiny_data, tiny_segmenter
from pipelines import cli
from pipelines.training import COMPONENT_NAMES

REPO = Path(__file__).resolve().parents[1]


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="spade pipeline")
    cli.add_arguments(parser)
    return cli.main(parser.parse_args(list(argv)))


def test_cli_module_imports_nothing_heavy() -> None:
    code = "import sys, pipelines.cli; bad = {'kfp', 'torch', 'components'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_compile_writes_the_ir(tmp_path: Path) -> None:
    out = tmp_path / "spade-training.yaml"
    assert run_cli("compile", "--out", str(out), "--set", "train.iterations=1234") == 0
    ir = yaml.safe_load(out.read_text())
    components = ir["components"]
    for stage in COMPONENT_NAMES:
        assert f"comp-{stage}" in components, stage
        assert "pip install" not in " ".join(ir["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]["command"])
    # the pseudo-labelling branch runs only for unlabeled photos; both branches merge into the train input
    conditions = {
        name: task["triggerPolicy"]["condition"]
        for comp in components.values()
        for name, task in (comp.get("dag") or {}).get("tasks", {}).items()
        if task.get("triggerPolicy", {}).get("condition")
    }
    check = "inputs.parameter_values['pipelinechannel--fetch-dataset-needs_labels'] == true"
    assert sorted(conditions.values()) == sorted([check, f"!({check})"])
    branches = {name: components[f"comp-{name}"]["dag"]["tasks"] for name in conditions}
    assert sorted(next(iter(t)) for t in branches.values()) == ["pseudolabel", "use-labeled-dataset"]
    selectors = [  # dsl.OneOf: the train input is the dataset of whichever branch ran
        s["producerSubtask"]
        for comp in components.values()
        for out in (comp.get("dag") or {}).get("outputs", {}).get("artifacts", {}).values()
        for s in out["artifactSelectors"]
    ]
    assert sorted(set(selectors) & set(conditions)) == sorted(conditions)
    inputs = ir["root"]["inputDefinitions"]["parameters"]
    for name in ("source", "params", "mode", "num_nodes", "gpus_per_node", "segmenter_weights", "model_name"):
        assert name in inputs, name
    assert inputs["params"]["parameterType"] == "STRUCT"
    assert inputs["params"]["defaultValue"]["train"]["iterations"] == 1234  # params.yaml + --set
    assert inputs["params"]["defaultValue"]["model"]["label_nc"] == 8
    assert inputs["mode"]["defaultValue"] == "cluster"


def test_compile_cluster_settings(tmp_path: Path) -> None:
    out = tmp_path / "ir.yaml"
    run_cli(
        "compile", "--out", str(out), "--pvc", "spade-workspace",
        "--secret", "mlflow-s3:AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY",
        "--node-selector", "nvidia.com/gpu.present=true", "--toleration", "nvidia.com/gpu:NoSchedule",
        "--image", "registry.example/spade:2",
    )  # fmt: skip
    docs = list(yaml.safe_load_all(out.read_text()))
    ir, platform = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    images = {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/spade:2"} and "SPADE_IMAGE" not in os.environ
    assert ir["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]["image"]["runtimeValue"]["constant"] == (
        "registry.example/spade:2"  # the TrainJob's image
    )
    assert platform["exec-train"]["pvcMount"][0]["mountPath"] == "/workspace"
    assert [e["envVar"] for e in platform["exec-package-and-register"]["secretAsEnv"][0]["keyToEnv"]] == [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ]
    assert platform["exec-evaluate"]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert platform["exec-evaluate"]["tolerations"][0]["effect"] == "NoSchedule"
    assert ir["deploymentSpec"]["executors"]["exec-evaluate"]["container"]["resources"]["accelerator"]
    train_task = ir["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    assert train_task["workspace_pvc"]["runtimeValue"]["constant"] == "spade-workspace"


def test_compile_local_mode_takes_the_image_too(tmp_path: Path) -> None:
    out = tmp_path / "ir.yaml"
    run_cli("compile", "--out", str(out), "--mode", "local", "--image", "registry.example/spade:3")
    ir = yaml.safe_load(out.read_text())
    assert {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values()} == {"registry.example/spade:3"}
    assert ir["root"]["inputDefinitions"]["parameters"]["mode"]["defaultValue"] == "local"


@pytest.fixture
def kfp_server():  # noqa: ANN201
    with FakeKfpServer() as server:
        yield server


def test_submit_creates_a_run(kfp_server: FakeKfpServer, capsys) -> None:  # noqa: ANN001
    code = run_cli(
        "submit", "--host", kfp_server.host, "--source", "s3://datasets/landscapes.tar.gz", "--nodes", "2",
        "--gpus-per-node", "4", "--pvc", "spade-workspace", "--arg", "fid=true", "--set", "train.iterations=50",
        "--run-name", "nightly",
    )  # fmt: skip
    assert code == 0
    assert kfp_server.calls("GET", "/apis/v2beta1/healthz")
    assert kfp_server.calls("POST", "/apis/v2beta1/experiments")[0]["body"]["display_name"] == "spade"
    (run,) = kfp_server.calls("POST", "/apis/v2beta1/runs")
    body = run["body"]
    assert body["display_name"] == "nightly" and body["experiment_id"] == "exp-1"
    # with Kubernetes settings the client sends {pipeline_spec: IR, platform_spec: kfp-kubernetes settings}
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "spade-training"
    executors = body["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-train"]["pvcMount"][0]["constant"] == "spade-workspace"
    args = body["runtime_config"]["parameters"]
    assert args["source"] == "s3://datasets/landscapes.tar.gz"
    assert args["num_nodes"] == 2 and args["gpus_per_node"] == 4 and args["fid"] is True
    assert args["params"]["train"]["iterations"] == 50
    assert "run-1" in capsys.readouterr().out


def test_schedule_creates_a_recurring_run(kfp_server: FakeKfpServer, capsys) -> None:  # noqa: ANN001
    code = run_cli(
        "schedule", "--host", kfp_server.host, "--cron", "0 3 * * 1", "--source", "flickr:?text=landscape",
        "--name", "weekly", "--pvc", "spade-workspace",
    )  # fmt: skip
    assert code == 0
    (job,) = kfp_server.calls("POST", "/apis/v2beta1/recurringruns")
    body = job["body"]
    assert body["display_name"] == "weekly" and body["experiment_id"] == "exp-1"
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"  # KFP's six fields, seconds first
    assert body["max_concurrency"] in (1, "1") and body["no_catchup"] is True and body["mode"] == "ENABLE"
    assert body["runtime_config"]["parameters"]["source"] == "flickr:?text=landscape"
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "spade-training"
    assert "rr-1" in capsys.readouterr().out


def test_cron_expressions() -> None:
    assert cli.cron_with_seconds("*/30 * * * *") == "0 */30 * * * *"
    assert cli.cron_with_seconds("0 0 3 * * 1") == "0 0 3 * * 1"
    with pytest.raises(SystemExit):
        cli.cron_with_seconds("daily")


def test_trainjob_manifest_for_two_nodes_of_four_gpus() -> None:
    job = build_trainjob(
        "spade-train-1", "ml", "registry.example/spade:1.2", 2, 4, "/workspace/run/params.yaml",
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        pvc_name="spade-workspace", secret_env={"mlflow-s3": ["AWS_ACCESS_KEY_ID"]}, memory="32Gi",
    )  # fmt: skip
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"] == {
        "name": "spade-train-1",
        "namespace": "ml",
        "labels": {"app.kubernetes.io/part-of": "spade", "app.kubernetes.io/component": "train"},
    }
    spec = job["spec"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": 4, "memory": "32Gi"}
    assert trainer["resourcesPerNode"]["requests"]["nvidia.com/gpu"] == 4
    assert trainer["command"] == ["torchrun", "-m", "spade", "train", "--params", "/workspace/run/params.yaml"]
    assert trainer["env"] == [
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "mlflow-s3", "key": "AWS_ACCESS_KEY_ID"}}}
    ]
    (patch,) = spec["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["containers"] == [
        {
            "name": "node",
            "volumeMounts": [
                {"name": "dshm", "mountPath": "/dev/shm"},
                {"name": "workspace", "mountPath": "/workspace"},
            ],
        }
    ]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    cpu_only = build_trainjob("j", "ns", "img", 1, 0, "/p.yaml")
    assert "resourcesPerNode" not in cpu_only["spec"]["trainer"]
    # both manifests are valid TrainJobs of the Trainer API the cluster manifests are checked against
    from test_k8s import validation_errors

    assert validation_errors(job) == [] and validation_errors(cpu_only) == []


def test_runs_end_to_end_under_kfp_local(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """An unlabeled photo archive: fetch -> pseudo-label -> train -> evaluate -> package and register."""
    from pipelines.demo import pack
    from pipelines.training import run_local

    data = tiny_data(tmp_path / "data")
    segmenter = tiny_segmenter(data, tmp_path / "segmenter.pt")
    archive = pack(data, tmp_path / "photos.tar.gz", photos_only=True)  # as `spade pipeline demo` does
    params = pipeline_params(data, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_local(
        {
            "source": str(archive),
            "params": params,
            "segmenter_weights": str(segmenter),
            "eval_segmenter_weights": str(segmenter),
            "eval_data": str(data),
        },
        params=params,
        pipeline_root=tmp_path / "pipeline",
    )
    from pipelines.demo import print_summary

    summary = print_summary(tmp_path / "pipeline", params)
    run = Path(summary["run"])
    assert (run / "pseudolabel" / "dataset" / "train_label").is_dir()  # the unlabeled branch ran
    assert not (run / "use-labeled-dataset").exists()
    assert Path(summary["checkpoint"]).is_file() and Path(summary["mar"]).is_file()
    assert summary["decision"] == "promoted" and summary["version"] == "1" and summary["model_name"] == "tiny"
    assert Path(summary["stored_archive"]).parent == tmp_path / "model-store"
    assert 0.0 <= summary["metrics"]["miou"] <= 1.0
    assert "registered model:       tiny version 1: promoted" in capsys.readouterr().out


def test_the_labeled_branch_runs_end_to_end_with_ground_truth_from_an_archive(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A labeled archive: fetch -> the labeled dataset as is (no pseudo-labels) -> train -> evaluate on ground
    truth given as an archive (fetched by the evaluate task, as an s3:// one is in the cluster) -> register."""
    from pipelines.demo import pack, print_summary
    from pipelines.training import run_local

    data = tiny_data(tmp_path / "data")
    segmenter = tiny_segmenter(data, tmp_path / "segmenter.pt")
    archive = pack(data, tmp_path / "labeled.tar.gz", photos_only=False)
    params = pipeline_params(data, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    arguments = {"source": str(archive), "params": params, "eval_segmenter_weights": str(segmenter)}
    run_local({**arguments, "eval_data": str(archive)}, params=params, pipeline_root=tmp_path / "pipeline")
    summary = print_summary(tmp_path / "pipeline", params)
    run = Path(summary["run"])
    assert not (run / "pseudolabel").exists()  # the labeled branch ran instead
    trained_on = run / "use-labeled-dataset" / "dataset" / "train_label"
    originals = sorted((data / "train_label").iterdir())
    assert [f.read_bytes() for f in sorted(trained_on.iterdir())] == [f.read_bytes() for f in originals]
    assert summary["decision"] == "promoted" and Path(summary["mar"]).is_file()
    scored = json.loads((run / "evaluate" / "evaluation" / "metrics.json").read_text())
    assert scored["counts"]["images"] == len(list((data / "val_label").iterdir()))  # the archive's val split


def test_a_failed_local_run_is_a_spade_error(tmp_path: Path) -> None:
    from pipelines.training import run_local
    from spade.errors import SpadeError

    with pytest.raises(SpadeError, match="fetch-dataset"):
        run_local({"source": str(tmp_path / "missing")}, params={}, pipeline_root=tmp_path / "pipeline")


def test_a_promoted_model_is_deployed_by_the_pipeline_and_answers(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """params.yaml `deploy:` set: the pipeline ends with a deploy task (under dsl.If promoted) that puts the
    new champion behind a running TorchServe; its endpoint then answers a label map with an image."""
    import io
    import urllib.request

    from PIL import Image

    from pipelines.demo import pack, print_summary
    from pipelines.training import make_pipeline, run_local
    from spade.serve.local_torchserve import LocalTorchServe
    from spade.serve.torchserve_api import TorchServe

    data = tiny_data(tmp_path / "data")
    segmenter = tiny_segmenter(data, tmp_path / "segmenter.pt")
    archive = pack(data, tmp_path / "labeled.tar.gz", photos_only=False)
    store = tmp_path / "ts-store"
    store.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with LocalTorchServe(store, token_auth=False, workdir=tmp_path / "ts") as ts:
        params = pipeline_params(data, tmp_path)
        params["deploy"] = {"torchserve_url": ts.management_url, "model_store": str(store),
                            "inference_url": ts.inference_url, "drain": 0}  # fmt: skip
        ir = make_pipeline(params).pipeline_spec
        assert "comp-deploy" in {k for k in ir.components}
        run_local(
            {"source": str(archive), "params": params, "segmenter_weights": str(segmenter),
             "eval_segmenter_weights": str(segmenter), "eval_data": str(data)},
            params=params, pipeline_root=tmp_path / "pipeline",
        )  # fmt: skip
        summary = print_summary(tmp_path / "pipeline", params)
        assert summary["decision"] == "promoted"
        from spade.serve.register import read_archive

        api = TorchServe(ts.management_url)
        assert api.versions("tiny") == [read_archive(summary["mar"]).version] == [api.default_version("tiny")]
        label = next((data / "val_label").glob("*.png")).read_bytes()
        req = urllib.request.Request(f"{ts.inference_url}/predictions/tiny", data=label, method="POST",
                                     headers={"Content-Type": "image/png"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=60) as resp:
            image = Image.open(io.BytesIO(resp.read()))
        assert image.size == (32, 32) and image.mode == "RGB"
        run = Path(summary["run"])
        assert (run / "deploy").is_dir() and not (run / "keep-serving").exists()

        # a second run scored on other data (a subset of the split): not comparable, not promoted, not deployed
        first = api.default_version("tiny")
        run_local(
            {"source": str(archive), "params": params, "segmenter_weights": str(segmenter),
             "eval_segmenter_weights": str(segmenter), "eval_data": str(data), "eval_num_samples": 1},
            params=params, pipeline_root=tmp_path / "pipeline2",
        )  # fmt: skip
        second = print_summary(tmp_path / "pipeline2", params)
        assert second["decision"] == "candidate" and "scored on other data" in second["reason"]
        assert (Path(second["run"]) / "keep-serving").is_dir() and not (Path(second["run"]) / "deploy").exists()
        assert api.versions("tiny") == [first] == [api.default_version("tiny")]

    # without endpoint settings the pipeline has no deploy task at all
    assert "comp-deploy" not in set(make_pipeline(pipeline_params(data, tmp_path)).pipeline_spec.components)
