"""Stage 6 (when params.yaml `deploy.torchserve_url` is set): the promoted model goes live behind TorchServe."""

from typing import NamedTuple

from kfp.dsl import Input, Model

from components import spade_component


@spade_component
def deploy(
    archive: Input[Model],
    torchserve_url: str,
    model_store: str = "",
    archive_url: str = "",
    inference_url: str = "",
    workers: int = 1,
    timeout: float = 300.0,
    drain: float = 5.0,
) -> NamedTuple("DeployOutputs", version=str, previous=str):
    """spade.serve.deploy.deploy_to_torchserve of the archive package_and_register built: registered as a new
    version, checked, made the default, the previous version retired; any failure leaves the old one serving.

    The management key comes from $TORCHSERVE_MANAGEMENT_TOKEN (a Secret in the cluster), the inference key for
    the check request from $TORCHSERVE_INFERENCE_TOKEN.
    """
    import collections
    import json
    import os
    from pathlib import Path

    from spade.serve.deploy import INFERENCE_TOKEN_ENV, deploy_to_torchserve
    from spade.serve.torchserve_api import TOKEN_ENV, TorchServe

    mar = Path(archive.path) / str(archive.metadata.get("mar") or f"{archive.metadata.get('name', 'spade')}.mar")
    result = deploy_to_torchserve(
        mar,
        TorchServe(torchserve_url, os.environ.get(TOKEN_ENV) or None),
        model_store=Path(model_store) if model_store else None,
        archive_url=archive_url or None,
        workers=workers,
        ready_timeout=timeout,
        drain=drain,
        inference_url=inference_url or None,
        inference_token=os.environ.get(INFERENCE_TOKEN_ENV) or None,
    )
    print(json.dumps(result, default=str))
    outputs = collections.namedtuple("DeployOutputs", ["version", "previous"])
    return outputs(str(result["version"]), str(result.get("previous") or ""))


@spade_component
def keep_serving(outcome: str, model_name: str, version: str) -> str:
    """The other branch of the deploy step: the candidate was not promoted, so the champion keeps serving
    (said in the run, so that the graph shows why nothing was deployed)."""
    message = f"{model_name} version {version}: {outcome}, not promoted; the champion keeps serving"
    print(message)
    return message
