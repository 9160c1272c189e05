"""`spade pipeline ...`: compile, run locally, submit or schedule the Kubeflow training pipeline, and the demo.

Imports nothing heavy at import time (no kfp, no torch): `spade --help` builds every parser.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES = """examples:
  spade pipeline compile --out spade-training.yaml           # IR YAML for the KFP UI or `submit`
  spade pipeline compile --out spade-training.yaml --pvc spade-workspace \\
      --secret mlflow-s3:AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY \\
      --node-selector nvidia.com/gpu.present=true --toleration nvidia.com/gpu:NoSchedule
  spade pipeline run --source data/builtin --set train.iterations=50   # kfp.local, in subprocesses here
  spade pipeline run --source photos.tar.gz --arg segmenter_weights=runs/segmenter/small_segmenter.pt
  spade pipeline submit --host http://localhost:8080 --source s3://datasets/landscapes.tar.gz \\
      --nodes 2 --gpus-per-node 4 --pvc spade-workspace --secret mlflow-s3:AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY \\
      --set register.store=s3://models/spade --arg segmenter_weights=s3://weights/small_segmenter.pt \\
      --arg eval_segmenter_weights=s3://weights/small_segmenter.pt
  spade pipeline schedule --host http://localhost:8080 --cron "0 3 * * 1" --source 'flickr:?text=landscape' \\
      --pvc spade-workspace                                    # retrain every Monday at 03:00
  spade pipeline demo                                          # what `make demo` runs: the whole pipeline, locally
  spade pipeline demo --runner docker --image spade:dev        # every task in a container (make image first)
"""

DEFAULT_PIPELINE_ROOT = "runs/pipeline"
DEFAULT_EXPERIMENT = "spade"


def _parse_key_values(items: list[str], what: str, *, as_yaml: bool = True) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"error: {what} {item!r} must look like NAME=VALUE")
        out[key.strip()] = (yaml.safe_load(value) if value.strip() else "") if as_yaml else value
    return out


def parse_secret(text: str) -> tuple[str, list[str]]:
    """'NAME:KEY1,KEY2' -> (NAME, [KEY1, KEY2])."""
    name, sep, keys = text.partition(":")
    parts = [k.strip() for k in keys.split(",") if k.strip()]
    if not sep or not name.strip() or not parts:
        raise SystemExit(f"error: --secret {text!r} must look like SECRET:KEY[,KEY...]")
    return name.strip(), parts


def parse_toleration(text: str) -> dict:
    """'KEY[=VALUE][:EFFECT]' -> a toleration dict (operator Equal with a value, else Exists)."""
    body, _, effect = text.partition(":")
    key, sep, value = body.partition("=")
    if not key.strip():
        raise SystemExit(f"error: --toleration {text!r} must look like KEY[=VALUE][:EFFECT]")
    tol = {"key": key.strip(), "operator": "Equal" if sep else "Exists"}
    if sep:
        tol["value"] = value
    if effect:
        tol["effect"] = effect
    return tol


def cron_with_seconds(expr: str) -> str:
    """KFP's scheduler reads six fields (seconds first); a classic five-field expression gets '0' seconds."""
    fields = expr.split()
    if len(fields) == 5:
        return "0 " + " ".join(fields)
    if len(fields) == 6 or expr.startswith("@"):
        return expr
    raise SystemExit(f"error: --cron {expr!r}: expected 5 fields (min hour day month weekday) or 6 (seconds first)")


def _add_params(p: argparse.ArgumentParser) -> None:
    from spade.config import add_settings_arguments

    add_settings_arguments(
        p, example="train.iterations=200", params_help="settings file (default: ./params.yaml, else the repository's)"
    )


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", help="dataset: folder, archive, http(s)://, s3:// or flickr:?text=... (pipeline source)")
    p.add_argument("--sha256", help="expected SHA-256 of an archive source")
    p.add_argument("--nodes", type=int, help="TrainJob nodes (cluster mode)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per TrainJob node (cluster mode)")
    p.add_argument(
        "--arg",
        dest="arguments",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other pipeline parameter (value parsed as YAML), e.g. fid=true (repeatable)",
    )


def _add_cluster(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (Kubernetes settings of the tasks)")
    g.add_argument("--image", help="project image of every task (default: $SPADE_IMAGE or the published one)")
    g.add_argument("--pvc", help="ReadWriteMany claim shared by the train task and its TrainJob")
    g.add_argument("--mount-path", default="/workspace", help="where that claim is mounted (default /workspace)")
    g.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="SECRET:KEY[,KEY]",
        help="expose keys of a Secret as environment variables of the same names (repeatable)",
    )
    g.add_argument("--node-selector", action="append", default=[], metavar="LABEL=VALUE", help="GPU tasks' nodes")
    g.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]", help="GPU tasks")
    g.add_argument("--task-gpus", type=int, default=1, help="GPUs of the evaluate and pseudolabel tasks (default 1)")


def _add_client(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", required=True, help="KFP API server, e.g. http://localhost:8080 (port-forwarded)")
    p.add_argument("--namespace", help="KFP (profile) namespace, for multi-user Kubeflow")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"experiment (default {DEFAULT_EXPERIMENT})")
    p.add_argument("--token", default=None, help="bearer token (default: $KFP_TOKEN)")
    p.add_argument("--pipeline-root", help="artifact root (default: the server's)")
    p.add_argument("--no-cache", action="store_true", help="run every task again (no KFP caching)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="pipeline_command", required=True, metavar="PIPELINE_COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = add("compile", "Write the training pipeline's IR YAML (for the KFP UI, `submit` or GitOps).")
    p.add_argument("--out", type=Path, default=Path("spade-training.yaml"), help="YAML to write")
    p.add_argument("--mode", choices=("cluster", "local"), default="cluster", help="default of `mode` (cluster)")
    _add_params(p)
    _add_cluster(p)

    p = add("run", "Run the training pipeline here with kfp.local (each task a subprocess of this Python).")
    p.add_argument("--pipeline-root", type=Path, default=Path(DEFAULT_PIPELINE_ROOT), help="artifacts folder")
    _add_params(p)
    _add_arguments(p)

    p = add("submit", "Submit one run of the training pipeline to a Kubeflow Pipelines server.")
    _add_client(p)
    p.add_argument("--run-name", help="run name (default: spade-training-TIMESTAMP)")
    _add_params(p)
    _add_arguments(p)
    _add_cluster(p)

    p = add("schedule", "Create a recurring run (cron) of the training pipeline: scheduled retraining.")
    _add_client(p)
    p.add_argument("--cron", required=True, help="cron expression: 5 fields, or 6 with seconds first (KFP's form)")
    p.add_argument("--name", default="spade-retraining", help="recurring run name (default spade-retraining)")
    p.add_argument("--max-concurrency", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--catchup", action="store_true", help="also start the runs missed while paused")
    p.add_argument("--paused", action="store_true", help="create it disabled")
    _add_params(p)
    _add_arguments(p)
    _add_cluster(p)

    p = add("demo", "The whole pipeline locally on the built-in landscapes (what `make demo` runs).")
    p.add_argument("--pipeline-root", type=Path, default=Path(DEFAULT_PIPELINE_ROOT), help="artifacts folder")
    p.add_argument("--work", type=Path, default=Path("data/demo"), help="archive and segmenter folder (data/demo)")
    p.add_argument("--labeled", action="store_true", help="fetch the labeled set (skips pseudo-labelling)")
    p.add_argument(
        "--runner",
        choices=("subprocess", "docker"),
        default="subprocess",
        help="subprocess (default; no Docker needed): each task a subprocess of this Python. docker: each task a "
        "container of --image, against an object store, PostgreSQL and an MLflow server started for the run",
    )
    p.add_argument("--image", default="spade:dev", help="project image of the docker runner (default spade:dev)")
    p.add_argument(
        "--no-serve",
        action="store_true",
        help="no TorchServe: the pipeline ends at registration (by default the subprocess runner's demo deploys "
        "the promoted model to a TorchServe on 127.0.0.1 and sends it one label map)",
    )
    _add_params(p)


# --------------------------------------------------------------------------- helpers


def _params(args: argparse.Namespace) -> dict:
    from pipelines.training import load_params

    return load_params(args.params, list(args.overrides))


def _cluster(args: argparse.Namespace):  # noqa: ANN202
    from pipelines.training import ClusterOptions

    return ClusterOptions(
        pvc_name=args.pvc or "",
        mount_path=args.mount_path,
        secrets=dict(parse_secret(s) for s in args.secret),
        node_selector=_parse_key_values(args.node_selector, "--node-selector", as_yaml=False),
        tolerations=[parse_toleration(t) for t in args.toleration],
        task_gpus=args.task_gpus,
    )


def pipeline_arguments(args: argparse.Namespace, params: dict) -> dict:
    out: dict = {"params": params}
    if args.source:
        out["source"] = args.source
    if args.sha256:
        out["source_sha256"] = args.sha256
    if args.nodes is not None:
        out["num_nodes"] = args.nodes
    if args.gpus_per_node is not None:
        out["gpus_per_node"] = args.gpus_per_node
    out.update(_parse_key_values(args.arguments, "--arg"))
    return out


def _client(args: argparse.Namespace):  # noqa: ANN202
    import warnings

    import kfp

    warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline", category=FutureWarning)

    token = args.token or os.environ.get("KFP_TOKEN") or None
    return kfp.Client(host=args.host, namespace=args.namespace or "kubeflow", existing_token=token)


def _compiled(args: argparse.Namespace, params: dict, folder: str) -> Path:
    from pipelines.training import compile_pipeline

    return compile_pipeline(Path(folder) / "spade-training.yaml", params, _cluster(args), image=args.image or "")


# --------------------------------------------------------------------------- commands


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.training import compile_pipeline

    cluster = _cluster(args) if args.mode == "cluster" else None
    out = compile_pipeline(args.out, _params(args), cluster, image=args.image or "")
    print(f"wrote {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.demo import print_summary
    from pipelines.training import run_local

    params = _params(args)
    arguments = pipeline_arguments(args, params)
    run_local(arguments, pipeline_root=args.pipeline_root, params=params)
    print_summary(args.pipeline_root, params)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    params = _params(args)
    arguments = pipeline_arguments(args, params)
    with tempfile.TemporaryDirectory(prefix="spade-pipeline-") as tmp:
        package = _compiled(args, params, tmp)
        client = _client(args)
        result = client.create_run_from_pipeline_package(
            str(package),
            arguments=arguments,
            run_name=args.run_name or f"spade-training {time.strftime('%Y-%m-%d %H-%M-%S')}",
            experiment_name=args.experiment,
            namespace=args.namespace,
            pipeline_root=args.pipeline_root,
            enable_caching=False if args.no_cache else None,
        )
    url = f"{args.host.rstrip('/')}/#/runs/details/{result.run_id}"
    print(f"submitted run {result.run_id} in experiment {args.experiment}: {url}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    params = _params(args)
    arguments = pipeline_arguments(args, params)
    cron = cron_with_seconds(args.cron)
    with tempfile.TemporaryDirectory(prefix="spade-pipeline-") as tmp:
        package = _compiled(args, params, tmp)
        client = _client(args)
        experiment = client.create_experiment(args.experiment, namespace=args.namespace)
        job = client.create_recurring_run(
            experiment_id=experiment.experiment_id,
            job_name=args.name,
            description=f"scheduled retraining ({args.cron})",
            cron_expression=cron,
            max_concurrency=args.max_concurrency,
            no_catchup=not args.catchup,
            params=arguments,
            pipeline_package_path=str(package),
            enabled=not args.paused,
            pipeline_root=args.pipeline_root,
            enable_caching=False if args.no_cache else None,
        )
    state = "paused" if args.paused else "enabled"
    print(f"recurring run {job.recurring_run_id} ({args.name}, cron '{cron}', {state}) in experiment {args.experiment}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    run_demo(
        args.params,
        list(args.overrides),
        pipeline_root=args.pipeline_root,
        work=args.work,
        labeled=args.labeled,
        runner=args.runner,
        image=args.image,
        serve=not args.no_serve,
    )
    return 0


COMMANDS = {"compile": cmd_compile, "run": cmd_run, "submit": cmd_submit, "schedule": cmd_schedule, "demo": cmd_demo}


def main(args: argparse.Namespace) -> int:
    return COMMANDS[args.pipeline_command](args)


def _standalone(argv: list[str] | None = None) -> int:
    """`python -m pipelines.cli ...` (the same as `spade pipeline ...`)."""
    from spade.errors import SpadeError

    parser = argparse.ArgumentParser(
        prog="spade pipeline", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main(args)
    except SpadeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_standalone())
