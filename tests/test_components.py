"""Each pipeline component alone (its python_func, on tiny inputs), and the train component's cluster mode
against a stand-in for the Kubernetes CustomObjectsApi."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from kfp import dsl

from components import IMAGE, trainjob
from components.evaluate import evaluate
from components.fetch_dataset import fetch_dataset, use_labeled_dataset
from components.package_and_register import package_and_register
from components.pseudolabel import pseudolabel
from components.train import train
from pipeline_helpers import pipeline_params, tiny_data, tiny_segmenter


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("components")
    data = tiny_data(root / "data")
    return {
        "root": root,
        "data": data,
        "segmenter": tiny_segmenter(data, root / "segmenter.pt"),
        "params": pipeline_params(data, root),
    }


def artifact(kind: type, path: Path, **metadata: object) -> dsl.Artifact:
    return kind(name=path.name, uri=str(path), metadata=dict(metadata))


@pytest.fixture(scope="module")
def trained(work: dict) -> tuple[dsl.Model, dsl.Dataset]:
    dataset = artifact(dsl.Dataset, work["data"], layout="custom", root="")
    model = artifact(dsl.Model, work["root"] / "model")
    out = train.python_func(dataset=dataset, model=model, params=work["params"], mode="local")
    assert out.iterations == 2
    return model, dataset


def test_components_install_nothing_at_run_time() -> None:
    for component in (fetch_dataset, use_labeled_dataset, pseudolabel, train, evaluate, package_and_register):
        container = component.component_spec.implementation.container
        script = " ".join(container.command)
        assert "pip install" not in script, component.name
        assert container.image == IMAGE, component.name  # the project image ($SPADE_IMAGE)


def test_fetch_labeled_folder(work: dict, tmp_path: Path) -> None:
    out = artifact(dsl.Dataset, tmp_path / "fetched")
    result = fetch_dataset.python_func(source=str(work["data"]), dataset=out)
    assert result.needs_labels is False and result.layout == "custom" and result.files > 0
    assert out.metadata["layout"] == "custom" and out.metadata["fingerprint"] == result.fingerprint
    assert (tmp_path / "fetched" / "classes.txt").is_file()

    passed = artifact(dsl.Dataset, tmp_path / "as-is")
    use_labeled_dataset.python_func(fetched=out, dataset=passed)
    assert (tmp_path / "as-is" / "train_label").is_dir() and passed.metadata["layout"] == "custom"


def test_fetch_and_pseudolabel_photos(work: dict, tmp_path: Path) -> None:
    from pipelines.demo import pack

    photos = pack(work["data"], tmp_path / "photos.tar.gz", photos_only=True)  # photos/{train,val}/*.jpg
    fetched = artifact(dsl.Dataset, tmp_path / "fetched")
    result = fetch_dataset.python_func(source=str(photos), dataset=fetched)
    assert result.needs_labels is True and result.layout == "photos"
    assert fetched.metadata["root"] == "" and (tmp_path / "fetched" / "train").is_dir()

    labelled = artifact(dsl.Dataset, tmp_path / "labelled")
    count = pseudolabel.python_func(
        photos=fetched, dataset=labelled, segmenter="small", segmenter_weights=str(work["segmenter"]), batch_size=4
    )
    assert count == 12  # 8 train + 4 val photos
    root = tmp_path / "labelled"
    assert len(list((root / "train_label").iterdir())) == 8 and len(list((root / "val_label").iterdir())) == 4
    assert not any(p.is_symlink() for p in (root / "train_img").iterdir())  # artifacts hold their own files
    assert labelled.metadata["layout"] == "custom"


def test_train_local(trained: tuple) -> None:
    model, _ = trained
    assert model.metadata["checkpoint"] == "final.pt" and model.metadata["mode"] == "local"
    assert (Path(model.path) / "final.pt").is_file()


def test_evaluate_and_register(work: dict, trained: tuple, tmp_path: Path) -> None:
    model, dataset = trained
    metrics = artifact(dsl.Metrics, tmp_path / "metrics")
    evaluation = artifact(dsl.Artifact, tmp_path / "evaluation")
    scores = evaluate.python_func(
        model=model,
        dataset=dataset,
        metrics=metrics,
        evaluation=evaluation,
        params=work["params"],
        segmenter="small",
        segmenter_weights=str(work["segmenter"]),
        batch_size=4,
    )
    assert 0.0 <= scores.miou <= 1.0 and scores.fid == -1.0  # no FID asked for: -1, as JSON has no NaN
    assert metrics.metadata["mIoU"] == pytest.approx(scores.miou)
    assert (tmp_path / "evaluation" / "metrics.json").is_file()

    archive = artifact(dsl.Model, tmp_path / "archive")
    decision = artifact(dsl.Artifact, tmp_path / "decision")
    out = package_and_register.python_func(
        model=model, evaluation=evaluation, archive=archive, decision=decision, params=work["params"], version="1.0"
    )
    assert out.model_name == "tiny" and out.outcome == "promoted" and out.promoted is True and out.version == "1"
    assert (tmp_path / "archive" / "tiny.mar").is_file()
    assert (tmp_path / "archive" / "kserve" / "model-store" / "tiny.mar").is_file()
    assert Path(out.archive_uri).parent == work["root"] / "model-store"
    stored_layout = work["root"] / "model-store" / Path(out.archive_uri).stem / "kserve"  # beside the archive
    assert (stored_layout / "config" / "config.properties").is_file()
    assert (stored_layout / "model-store" / "tiny.mar").read_bytes() == (tmp_path / "archive" / "tiny.mar").read_bytes()
    assert decision.metadata["decision"] == "promoted" and Path(decision.path).is_file()


def test_register_settings_are_checked_by_name(tmp_path: Path) -> None:
    from spade.errors import SpadeError

    params = {"register": {"store": str(tmp_path / "store"), "min_miou": 0.3}}
    with pytest.raises(SpadeError, match=r"unknown register settings: min_miou \(known: .*miou_tolerance"):
        package_and_register.python_func(
            model=artifact(dsl.Model, tmp_path / "model"),
            evaluation=artifact(dsl.Artifact, tmp_path / "evaluation"),
            archive=artifact(dsl.Model, tmp_path / "archive"),
            decision=artifact(dsl.Artifact, tmp_path / "decision"),
            params=params,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # found before anything was packaged


class FakeCustomObjects:
    """CustomObjectsApi stand-in: a TrainJob that 'runs' by copying a finished run onto the workspace claim."""

    def __init__(self, finished_run: Path, final_conditions: list[dict]) -> None:
        self.finished_run = finished_run
        self.final_conditions = final_conditions
        self.created: list[dict] = []
        self.polls = 0
        self.deleted: list[str] = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):  # noqa: ANN001, ANN201
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        self.created.append(copy.deepcopy(body))
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):  # noqa: ANN001, ANN201
        self.polls += 1
        job = copy.deepcopy(self.created[-1])
        if self.polls == 1:
            job["status"] = {"conditions": [], "jobsStatus": [{"name": "node", "active": 2, "ready": 2}]}
            return job
        if any(c["type"] == "Complete" for c in self.final_conditions):
            out = Path(job["spec"]["trainer"]["command"][5]).parent / "out"  # beside --params FILE
            shutil.copytree(self.finished_run, out, dirs_exist_ok=True)
        job["status"] = {"conditions": self.final_conditions}
        return job

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):  # noqa: ANN001, ANN201
        self.deleted.append(name)


def run_cluster_train(work: dict, trained: tuple, tmp_path: Path, conditions: list[dict], monkeypatch) -> tuple:  # noqa: ANN001
    model, dataset = trained
    fake = FakeCustomObjects(Path(model.path), conditions)
    monkeypatch.setattr(trainjob, "custom_objects_api", lambda: fake)
    out = artifact(dsl.Model, tmp_path / "cluster-model")
    result = train.python_func(
        dataset=dataset,
        model=out,
        params=work["params"],
        mode="cluster",
        image="registry.example/spade:1.2",
        namespace="ml",
        num_nodes=2,
        gpus_per_node=4,
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        workspace_pvc="spade-workspace",
        workspace_mount=str(tmp_path / "workspace"),
        secret_env={"mlflow-s3": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]},
        poll_seconds=0.0,
    )
    return fake, out, result


def test_train_cluster_succeeds(work: dict, trained: tuple, tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    complete = [{"type": "Complete", "status": "True", "reason": "JobsCompleted"}]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.mlops:5000")
    fake, out, result = run_cluster_train(work, trained, tmp_path, complete, monkeypatch)
    (job,) = fake.created
    spec = job["spec"]
    assert job["metadata"]["namespace"] == "ml" and spec["runtimeRef"]["name"] == "torch-distributed"
    assert spec["trainer"]["numNodes"] == 2 and spec["trainer"]["numProcPerNode"] == 4
    assert spec["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
    assert spec["trainer"]["image"] == "registry.example/spade:1.2"
    env = {e["name"]: e for e in spec["trainer"]["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.mlops:5000"  # passed on to the nodes
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "mlflow-s3",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    params_file = Path(spec["trainer"]["command"][5])
    assert params_file.is_file() and (params_file.parent / "data" / "classes.txt").is_file()  # staged on the claim
    (node,) = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["spade-workspace"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert (Path(out.path) / "final.pt").is_file() and out.metadata["mode"] == "cluster"
    assert result.iterations == 2
    assert "TrainJob" in capsys.readouterr().out  # its status is streamed


def test_train_cluster_failure_carries_the_reason(work: dict, trained: tuple, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    failed = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "node-0 exited 1"}]
    with pytest.raises(trainjob.TrainJobFailed, match="BackoffLimitExceeded: node-0 exited 1"):
        run_cluster_train(work, trained, tmp_path, failed, monkeypatch)


def test_trainjob_timeout_deletes_the_job() -> None:
    class NeverDone(FakeCustomObjects):
        def get_namespaced_custom_object(self, *args):  # noqa: ANN002, ANN201
            return copy.deepcopy(self.created[-1])

    fake = NeverDone(Path("."), [])
    manifest = trainjob.build_trainjob("j", "ns", "img", 1, 0, "/w/params.yaml")
    with pytest.raises(trainjob.TrainJobFailed, match="did not finish"):
        trainjob.run_trainjob(fake, manifest, poll_s=0, timeout_s=0, log=lambda _: None)
    assert fake.deleted == ["j"]


def test_cluster_mode_needs_a_workspace_claim(work: dict, trained: tuple, tmp_path: Path) -> None:
    from spade.errors import SpadeError

    model, dataset = trained
    with pytest.raises(SpadeError, match="workspace PVC"):
        train.python_func(
            dataset=dataset, model=artifact(dsl.Model, tmp_path / "m"), params=work["params"], mode="cluster"
        )


def test_evaluation_never_falls_back_to_another_split(work: dict, trained: tuple, tmp_path: Path) -> None:
    """A dataset without the asked-for split (a pseudo-labelled collection has only train) stops the
    evaluation with what to do; scoring the training labels happens only when the split says so."""
    from spade.errors import SpadeError

    model, _ = trained
    only_train = tmp_path / "only-train"
    shutil.copytree(work["data"], only_train, ignore=shutil.ignore_patterns("val_*"))
    dataset = artifact(dsl.Dataset, only_train, layout="custom", root="")

    def run(split: str, out: str) -> object:
        return evaluate.python_func(
            model=model, dataset=dataset, metrics=artifact(dsl.Metrics, tmp_path / f"m-{out}"),
            evaluation=artifact(dsl.Artifact, tmp_path / out), params=work["params"], segmenter="small",
            segmenter_weights=str(work["segmenter"]), batch_size=4, split=split,
        )  # fmt: skip

    with pytest.raises(SpadeError, match=r"has no val split.*eval_data.*evaluate.split: train"):
        run("val", "val")
    assert not (tmp_path / "val" / "metrics.json").exists()
    run("train", "train")  # explicit: allowed, and recorded
    written = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert written["data"]["split"] == "train"


def test_the_train_task_never_drops_the_vgg_loss(work: dict, tmp_path: Path, monkeypatch) -> None:
    """train.vgg_loss=true without the VGG19 weights stops the task naming the file, instead of training
    without the loss as it once did behind the user's back."""
    from spade.errors import SpadeError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    params = json.loads(json.dumps(work["params"]))
    params["train"]["vgg_loss"] = True
    dataset = artifact(dsl.Dataset, work["data"], layout="custom", root="")
    with pytest.raises(SpadeError, match="vgg19-dcbb9e9d.pth"):
        train.python_func(dataset=dataset, model=artifact(dsl.Model, tmp_path / "m"), params=params, mode="local")
    assert not (tmp_path / "m" / "final.pt").exists()
