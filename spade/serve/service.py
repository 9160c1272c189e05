"""The synthesis service: one loaded model, request validation, batched synthesis, PNG responses.

Server-agnostic on purpose: the TorchServe handler (`spade.serve.handler`), the
painter page (`spade studio`) and the serving benchmark all wrap this class, and
another server could too.

Requests (one payload per client request):

- raw bytes of a label-map PNG (single channel, class ids as in the data set files);
- a mapping of fields (multipart form or JSON object): ``label`` (PNG, base64 in
  JSON), optional ``instance`` (PNG of instance ids), ``style`` (an RGB photo, for
  models with an image encoder), ``seed`` (int) and ``output_size`` (``[width,
  height]`` or one int for a square);
- ``{"describe": true}``, answered with `info()` as JSON (classes, colours, sizes);
- the KServe v1 envelope, ``{"instances": [fields, ...]}``, answered with
  ``{"predictions": [base64 PNG, ...]}``. Binary values may also be given as
  ``{"b64": "..."}``, the KServe convention.

Every problem with a request becomes a `RequestError` with an HTTP status and a
message that says what is wrong; one bad request never fails the others of its batch.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spade.checkpoints import Checkpoint
from spade.errors import SpadeError
from spade.labels import SINGLE_CHANNEL_MODES, to_class_ids
from spade.serve.protocol import DEFAULT_MAX_PIXELS, RequestError, Response, decode_base64, decode_image
from spade.synthesize import Synthesizer, resize_ids, to_uint8

FIELDS = ("label", "instance", "style", "seed", "output_size")
DEFAULT_MAX_INSTANCES = 16
MAX_SEED = 2**63 - 1
_BASE64_TEXT = re.compile(rb"(data:[\w/+.-]*;base64,)?[A-Za-z0-9+/=\s]+")


@dataclass
class SynthesisRequest:
    """One validated image request, ids already converted and resized to the model's size."""

    label: torch.Tensor  # (1, H, W) int64 class ids at the model's resolution
    instance: torch.Tensor | None  # (1, H, W) int64, for instance-aware models
    style: torch.Tensor | None = None  # (3, H, W) in [-1, 1] at the model's resolution
    seed: int = 0
    output_size: tuple[int, int] | None = None  # (width, height) of the answer; None = the model's


@dataclass
class _Parsed:
    requests: list[SynthesisRequest] = field(default_factory=list)
    envelope: bool = False  # True: answer with {"predictions": [...]}


CITYSCAPES_NAMES = (
    "unlabeled", "ego vehicle", "rectification border", "out of roi", "static", "dynamic", "ground", "road",
    "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel", "pole",
    "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
    "bus", "caravan", "trailer", "train", "motorcycle", "bicycle", "license plate",
)  # fmt: skip


def class_names(checkpoint: Checkpoint) -> list[str]:
    """Names of the model's classes: from the training data when recorded, else the preset's, else numbered."""
    cfg = checkpoint.config
    names = checkpoint.meta.get("class_names")
    if isinstance(names, list) and len(names) == cfg.label_nc:
        return [str(n) for n in names]
    if cfg.preset == "coco":
        from spade.evaluate.segmenters.deeplabv2 import cocostuff_class_names

        names = cocostuff_class_names()
        if len(names) == cfg.label_nc:
            return names
    if cfg.preset == "cityscapes" and cfg.label_nc == len(CITYSCAPES_NAMES):
        return list(CITYSCAPES_NAMES)
    return [f"class {i}" for i in range(cfg.label_nc)]


def class_colours(checkpoint: Checkpoint) -> list[list[int]]:
    """An RGB colour per class: the training data's own when recorded, else a generated palette."""
    from spade.visualize import palette

    cfg = checkpoint.config
    colours = checkpoint.meta.get("class_colours")
    if isinstance(colours, list) and len(colours) == cfg.label_nc:
        return [[int(c) for c in rgb] for rgb in colours]
    return palette(cfg.label_nc)[: cfg.label_nc].tolist()


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class SynthesisService:
    """A checkpoint loaded once; validates payloads and answers them with PNG images.

    `precision` "auto" runs bf16 where the device supports it natively; `fast` as for `Synthesizer`
    (False: the eager reference generator).
    `max_pixels` bounds every image in a request (label, instance, style, output).
    `max_batch` bounds one forward pass; larger batches are split.
    """

    def __init__(
        self,
        checkpoint: Checkpoint | str | Path,
        *,
        device: str = "cpu",
        precision: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_batch: int = 8,
        max_instances: int = DEFAULT_MAX_INSTANCES,
        fast: bool = True,
    ) -> None:
        if not isinstance(checkpoint, Checkpoint):
            checkpoint = Checkpoint.load(checkpoint)
        if max_pixels < 1 or max_batch < 1 or max_instances < 1:
            raise SpadeError("max_pixels, max_batch and max_instances must be positive")
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.synthesizer = Synthesizer(checkpoint, device=device, precision=precision, fast=fast)
        self.max_pixels = max_pixels
        self.max_batch = max_batch
        self.max_instances = max_instances

    # ---------------------------------------------------------------- description

    def info(self) -> dict:
        """What a client needs to paint a valid label map: classes, their file values and colours, sizes."""
        cfg = self.config
        height, width = cfg.output_size
        names = class_names(self.checkpoint)
        colours = class_colours(self.checkpoint)
        classes = [
            {"id": i, "value": i - cfg.label_offset, "name": names[i], "colour": colours[i]}
            for i in range(cfg.label_nc)
        ]
        return {
            "preset": cfg.preset,
            "label_nc": cfg.label_nc,
            "classes": classes,
            "dontcare_value": 255 if cfg.dontcare_id is not None else None,
            "width": width,
            "height": height,
            "multimodal": self.synthesizer.multimodal,
            "use_instance": cfg.use_instance,
            "precision": self.synthesizer.precision,
            "max_pixels": self.max_pixels,
            "fields": list(FIELDS),
        }

    # ---------------------------------------------------------------- parsing

    def parse(self, payload: bytes | bytearray | str | Mapping) -> _Parsed:
        """One client payload -> validated requests (several under the KServe envelope)."""
        if isinstance(payload, (bytes, bytearray)):
            data = bytes(payload)
            if not data:
                raise RequestError("empty request: send a label-map PNG as the body, or JSON / multipart fields")
            if data.lstrip()[:1] in (b"{", b"["):
                return self.parse(_json_payload(data))
            return _Parsed([self._request({"label": data})])
        if isinstance(payload, str):
            return self.parse(_json_payload(payload.encode()))
        if isinstance(payload, list):
            raise RequestError('a JSON request must be an object ({"label": ...} or {"instances": [...]}), not a list')
        if not isinstance(payload, Mapping):
            raise RequestError(f"unsupported request body of type {type(payload).__name__}")
        if "instances" in payload:
            extra = sorted(set(payload) - {"instances", "parameters"})
            if extra:
                raise RequestError(f"unknown field(s) {', '.join(map(repr, extra))} beside 'instances'")
            instances = payload["instances"]
            if not isinstance(instances, list) or not instances:
                raise RequestError("'instances' must be a non-empty list of objects")
            if len(instances) > self.max_instances:
                raise RequestError(
                    f"{len(instances)} instances in one request; at most {self.max_instances} are allowed", 413
                )
            requests = []
            for i, inst in enumerate(instances):
                if isinstance(inst, str):  # a bare base64 label map
                    inst = {"label": inst}
                if not isinstance(inst, Mapping):
                    raise RequestError(f"instances[{i}] must be an object with a 'label', got {type(inst).__name__}")
                try:
                    requests.append(self._request(inst))
                except RequestError as err:
                    raise RequestError(f"instances[{i}]: {err}", err.status) from None
            return _Parsed(requests, envelope=True)
        return _Parsed([self._request(payload)])

    def _request(self, fields: Mapping) -> SynthesisRequest:
        if not fields:
            raise RequestError(
                "empty request: send a label-map PNG as the body with Content-Type: image/png "
                "(curl -H 'Content-Type: image/png' --data-binary @map.png), or JSON / multipart fields"
            )
        unknown = sorted(str(k) for k in set(fields) - set(FIELDS))
        if unknown:
            raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(FIELDS)}")
        if fields.get("label") is None:
            raise RequestError("missing 'label': a single-channel PNG of class ids")
        cfg = self.config
        raw = self._id_map(fields["label"], "label")
        ids = _to_ids(raw, cfg)
        inst = None
        if fields.get("instance") is not None:
            inst = self._id_map(fields["instance"], "instance")
            if inst.shape != raw.shape:
                raise RequestError(
                    f"instance map is {inst.shape[1]}x{inst.shape[0]} but label map is {raw.shape[1]}x{raw.shape[0]}; "
                    "they must have the same size"
                )
        elif cfg.use_instance:
            inst = ids
        size = cfg.output_size
        label = torch.from_numpy(resize_ids(ids, size)).unsqueeze(0)
        instance = torch.from_numpy(resize_ids(inst, size)).unsqueeze(0) if cfg.use_instance else None
        style = None
        if fields.get("style") is not None:
            if not self.synthesizer.multimodal:
                raise RequestError(f"this {cfg.preset} model has no image encoder, so it cannot take a 'style' image")
            style = self._rgb(fields["style"], "style", size)
        return SynthesisRequest(
            label, instance, style, seed=_seed(fields.get("seed")), output_size=self._output_size(fields)
        )

    def _open(self, value: object, name: str) -> Image.Image:
        return decode_image(_binary(value, name), f"'{name}'", self.max_pixels)

    def _id_map(self, value: object, name: str) -> np.ndarray:
        img = self._open(value, name)
        if img.mode not in SINGLE_CHANNEL_MODES:
            raise RequestError(
                f"'{name}' must be a single-channel image of ids (PNG mode L, P or I), got mode {img.mode}; "
                "colour-coded maps must be converted to class ids first"
            )
        return np.asarray(img, dtype=np.int64)

    def _rgb(self, value: object, name: str, size: tuple[int, int]) -> torch.Tensor:
        img = self._open(value, name).convert("RGB")
        h, w = size
        if img.size != (w, h):
            img = img.resize((w, h), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0

    def _output_size(self, fields: Mapping) -> tuple[int, int] | None:
        value = fields.get("output_size")
        if value is None:
            return None
        if isinstance(value, (bytes, bytearray)):
            value = value.decode(errors="replace")
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip().startswith("[") else [int(v) for v in value.split("x")]
            except ValueError:
                raise RequestError(
                    f"'output_size' must be WIDTHxHEIGHT, [width, height] or one int; got {value!r}"
                ) from None
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if isinstance(value, Sequence) and len(value) == 1:
            value = [value[0], value[0]]
        if (
            not isinstance(value, Sequence)
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        ):
            raise RequestError(f"'output_size' must be [width, height] with positive ints; got {value!r}")
        w, h = value
        if w * h > self.max_pixels:
            raise RequestError(f"'output_size' {w}x{h} is {w * h} pixels; the limit is {self.max_pixels}", 413)
        return w, h

    # ---------------------------------------------------------------- synthesis

    def synthesize(self, requests: Sequence[SynthesisRequest]) -> list[np.ndarray]:
        """Validated requests -> (H, W, 3) uint8 images, in batches of at most `max_batch` per forward."""
        return [image for image, _ in self._synthesize_batched(requests)]

    def _synthesize_batched(self, requests: Sequence[SynthesisRequest]) -> list[tuple[np.ndarray, int]]:
        """Each request's image and the number of images its forward pass synthesized."""
        out: list[tuple[np.ndarray, int]] = []
        for start in range(0, len(requests), self.max_batch):
            chunk = requests[start : start + self.max_batch]
            label = torch.stack([r.label for r in chunk])
            instance = torch.stack([r.instance for r in chunk]) if self.config.use_instance else None
            z = self._styles(chunk) if self.synthesizer.multimodal else None
            images = to_uint8(self.synthesizer.synthesize(label, instance, z=z))
            for req, img in zip(chunk, images, strict=True):
                if req.output_size is not None and req.output_size != (img.shape[1], img.shape[0]):
                    img = np.asarray(Image.fromarray(img).resize(req.output_size, Image.BICUBIC))
                out.append((img, len(chunk)))
        return out

    def _styles(self, chunk: Sequence[SynthesisRequest]) -> torch.Tensor:
        synth = self.synthesizer
        z = torch.cat([synth.style_noise(1, r.seed) for r in chunk])
        styled = [i for i, r in enumerate(chunk) if r.style is not None]
        if styled:
            mu = synth.encode_style(torch.stack([chunk[i].style for i in styled])).cpu()
            z[styled] = mu
        return z

    def handle(self, payloads: Sequence[object]) -> list[Response]:
        """A batch of client payloads -> one response each; all valid ones share one batched forward."""
        parsed: list[_Parsed | RequestError | Response] = []
        for payload in payloads:
            try:
                if _is_describe(payload):
                    parsed.append(Response(200, "application/json", json.dumps(self.info()).encode()))
                else:
                    parsed.append(self.parse(payload))
            except RequestError as err:
                parsed.append(err)
        requests = [r for p in parsed if isinstance(p, _Parsed) for r in p.requests]
        images = iter(self._synthesize_batched(requests))
        responses = []
        for p in parsed:
            if isinstance(p, RequestError):
                responses.append(Response.error(p))
                continue
            if isinstance(p, Response):
                responses.append(p)
                continue
            made = [next(images) for _ in p.requests]
            pngs = [encode_png(image) for image, _ in made]
            forward_batch = max(size for _, size in made)
            if p.envelope:
                body = {"predictions": [base64.b64encode(png).decode("ascii") for png in pngs]}
                responses.append(Response(200, "application/json", json.dumps(body).encode(), forward_batch))
            else:
                responses.append(Response(200, "image/png", pngs[0], forward_batch))
        return responses


def _is_describe(payload: object) -> bool:
    """{"describe": true}: the client asks for `info()` (classes, sizes) instead of an image."""
    if isinstance(payload, (bytes, bytearray)) and payload.lstrip()[:1] == b"{" and len(payload) < 256:
        try:
            payload = json.loads(payload)
        except (UnicodeDecodeError, ValueError):
            return False
    return isinstance(payload, Mapping) and set(payload) == {"describe"} and payload["describe"] is True


def _json_payload(data: bytes) -> object:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"the body looks like JSON but does not parse ({exc})") from None


def _binary(value: object, name: str) -> bytes:
    """A field's bytes: raw (multipart) or base64 (JSON string, or {"b64": ...})."""
    if isinstance(value, Mapping):
        if set(value) != {"b64"}:
            raise RequestError(f'\'{name}\' as an object must be {{"b64": "<base64>"}}')
        value = value["b64"]
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
        if not _BASE64_TEXT.fullmatch(data):
            return data  # raw image bytes (multipart file or request body)
        try:  # base64 text sent in a form field (maybe a data URL)
            return decode_base64(data.decode("ascii"), name)
        except RequestError:
            return data  # not base64 after all: let the image decoder say what is wrong
    if not isinstance(value, str):
        raise RequestError(f"'{name}' must be an image (raw bytes, or base64 text in JSON), got {type(value).__name__}")
    return decode_base64(value, name)


def _to_ids(raw: np.ndarray, cfg) -> np.ndarray:
    try:
        return to_class_ids(raw, cfg, source="'label'")
    except SpadeError as err:
        raise RequestError(str(err)) from None


def _seed(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, (bytes, bytearray)):
        value = value.decode(errors="replace")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise RequestError(f"'seed' must be an integer, got {value!r}") from None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        raise RequestError(f"'seed' must be an integer in 0..{MAX_SEED}, got {value!r}")
    return value
