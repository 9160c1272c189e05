"""Stage 5: TorchServe archive + KServe layout, MLflow Model Registry version, and the promotion gate."""

from typing import NamedTuple

from kfp.dsl import Artifact, Input, Model, Output

from components import spade_component


@spade_component
def package_and_register(
    model: Input[Model],
    evaluation: Input[Artifact],
    archive: Output[Model],
    decision: Output[Artifact],
    params: dict,
    model_name: str = "",
    version: str = "",
    run_id: str = "",
    force: bool = False,
) -> NamedTuple("RegisterOutputs", outcome=str, promoted=bool, model_name=str, version=str, archive_uri=str):
    """spade.serve.package.package then spade.serve.register.register (params.yaml `package:` and `register:`).

    An empty `model_name` takes register.model_name, else package.name; an empty `version` a UTC timestamp.
    """
    import collections
    import json
    import time
    from pathlib import Path

    from components import runtime
    from spade.serve.package import ServingOptions, package
    from spade.serve.register import register

    settings = runtime.settings(params)
    pkg = runtime.section(params, "package")
    name = model_name or settings.register.model_name or pkg.get("name") or "spade"
    version = version or time.strftime("%Y%m%d%H%M%S", time.gmtime())
    options = ServingOptions(
        batch_size=int(pkg.get("batch_size", 4)),
        max_batch_delay_ms=int(pkg.get("max_batch_delay", 50)),
        workers=int(pkg.get("workers", 1)),
        precision=str(pkg.get("precision", "auto")),
    )
    checkpoint = runtime.checkpoint_path(model.path, model.metadata)
    built = package(checkpoint, name=name, version=version, out=archive.path, options=options, force=True)
    print(f"packaged {built.mar} and {built.kserve_root}")
    result = register(
        mar=built.mar,
        metrics=str(Path(evaluation.path) / evaluation.metadata.get("metrics_file", "metrics.json")),
        run_id=run_id or None,
        model_name=name,
        force=force,
        decision_out=decision.path,
        config=settings.register,
        tracking=settings.tracking,
        kserve=built.kserve_root,
    )
    archive.metadata.update({"mar": built.mar.name, "kserve": "kserve", "name": name, "version": version})
    decision.metadata.update({k: result.get(k) for k in ("model_name", "version", "decision", "promoted", "reason")})
    print(json.dumps({k: result.get(k) for k in ("model_name", "version", "decision", "reason")}, default=str))
    archive_uri = str((result.get("archive") or {}).get("uri") or "")
    outputs = collections.namedtuple("RegisterOutputs", ["outcome", "promoted", "model_name", "version", "archive_uri"])
    return outputs(
        str(result.get("decision")),
        bool(result.get("promoted")),
        str(result.get("model_name")),
        str(result.get("version")),
        archive_uri,
    )
