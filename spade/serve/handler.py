"""TorchServe adapter over `SynthesisService`: TorchServe's batch of requests in, one response each out.

The archive built by `spade package` carries a two-line handler file that
subclasses `SpadeHandler` (TorchServe wants exactly one class defined in the
handler module). Settings come from the archive's model-config YAML under
``handler:`` (precision, max_pixels, max_batch, max_instances, device).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from spade.errors import SpadeError
from spade.serve.service import RequestError, Response, SynthesisService

log = logging.getLogger(__name__)
RAW_BODY_KEYS = {"body", "data"}
BATCH_HEADER = "X-Spade-Batch-Size"  # images synthesized by the forward pass that answered this request
HANDLER_SETTINGS = {"precision", "max_pixels", "max_batch", "max_instances"}


def _payload(row: object) -> object:
    """One TorchServe request row -> a service payload (raw bytes, parsed JSON, or multipart fields)."""
    if isinstance(row, Mapping):
        keys = set(row)
        if keys and keys <= RAW_BODY_KEYS:
            return row.get("body") if row.get("body") is not None else row.get("data")
        return {k: v for k, v in row.items()}
    return row


class SpadeHandler:
    """initialize(context) loads the model once per worker; handle(data, context) answers a batch."""

    def __init__(self) -> None:
        self.service: SynthesisService | None = None
        self.initialized = False

    def initialize(self, context) -> None:
        props = context.system_properties
        model_dir = Path(props.get("model_dir", "."))
        settings = dict((getattr(context, "model_yaml_config", None) or {}).get("handler") or {})
        manifest = context.manifest or {}
        weights = model_dir / manifest.get("model", {}).get("serializedFile", "model.pt")
        gpu_id = props.get("gpu_id")
        device = settings.pop("device", None)
        if device is None:
            device = f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu"
        threads = settings.pop("threads", None) or os.environ.get("SPADE_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        unknown = sorted(set(settings) - HANDLER_SETTINGS)
        if unknown:
            raise SpadeError(
                f"unknown handler setting(s) {', '.join(unknown)} in the model config; known: "
                f"{', '.join(sorted(HANDLER_SETTINGS | {'device', 'threads'}))}"
            )
        self.service = SynthesisService(weights, device=device, **settings)
        log.info("spade: loaded %s on %s (%s)", weights.name, device, self.service.synthesizer.precision)
        self.initialized = True

    def handle(self, data: list, context) -> list[bytes]:
        if self.service is None:
            raise RuntimeError("SpadeHandler.handle called before initialize")
        try:
            responses = self.service.handle([_payload(row) for row in data])
        except RequestError as err:  # defensive: service.handle maps these per request
            responses = [Response.error(err)] * len(data)
        for idx, response in enumerate(responses):
            if context is not None:
                context.set_response_status(response.status, _PHRASES.get(response.status, ""), idx)
                context.set_response_content_type(idx, response.content_type)
                if response.forward_batch:
                    context.set_response_header(idx, BATCH_HEADER, str(response.forward_batch))
        return [r.body for r in responses]


_PHRASES = {200: "OK", 400: "Bad Request", 413: "Payload Too Large", 422: "Unprocessable Entity"}
