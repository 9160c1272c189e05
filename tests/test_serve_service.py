"""The synthesis service and its TorchServe adapter, without a server: parsing, errors, batching, precision."""

from __future__ import annotations

import base64
import json
import random

import numpy as np
import pytest
import torch

from serve_helpers import decode, label_map, make_checkpoint, png
from spade.checkpoints import Checkpoint
from spade.config import ModelConfig
from spade.serve.handler import BATCH_HEADER, SpadeHandler
from spade.serve.service import RequestError, SynthesisService, class_names
from spade.synthesize import Synthesizer, resize_ids, to_uint8


@pytest.fixture(scope="module")
def service() -> SynthesisService:
    return SynthesisService(make_checkpoint(), precision="float32", max_pixels=200 * 200)


@pytest.fixture(scope="module")
def vae_service() -> SynthesisService:
    return SynthesisService(make_checkpoint(vae=True), precision="float32")


def test_raw_png_body_matches_the_synthesizer_on_the_same_label(service):
    label = label_map()
    [resp] = service.handle([png(label)])
    assert (resp.status, resp.content_type) == (200, "image/png")
    image = decode(resp.body)
    assert image.shape == (32, 32, 3)
    synth = Synthesizer(service.checkpoint, precision="float32")
    ids = torch.from_numpy(resize_ids(label.astype(np.int64), (32, 32)))[None, None]
    np.testing.assert_array_equal(image, to_uint8(synth.synthesize(ids))[0])


def test_json_multipart_and_kserve_forms_give_the_same_image(service):
    label = png(label_map())
    b64 = base64.b64encode(label).decode()
    raw, as_json, as_bytes, as_form, kserve = service.handle(
        [
            label,
            json.dumps({"label": b64}).encode(),  # JSON body the server did not decode
            {"label": {"b64": b64}},  # JSON already decoded by TorchServe
            {"label": bytearray(label), "seed": b"0"},  # multipart fields
            {"instances": [{"label": b64}, {"label": b64, "output_size": [48, 20]}]},
        ]
    )
    assert all(r.status == 200 for r in (raw, as_json, as_bytes, as_form, kserve))
    for r in (as_json, as_bytes, as_form):
        assert r.body == raw.body
    # base64 wrapped at 76 columns (MIME style) is the same text in a JSON string as in a form field
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    in_json, in_form = service.handle([{"label": wrapped}, {"label": wrapped.encode()}])
    assert in_json.body == in_form.body == raw.body
    preds = json.loads(kserve.body)["predictions"]
    assert kserve.content_type == "application/json" and len(preds) == 2
    assert base64.b64decode(preds[0]) == raw.body
    assert decode(base64.b64decode(preds[1])).shape == (20, 48, 3)


def test_one_batched_forward_for_several_requests(service):
    calls = []
    hook = service.synthesizer.generator.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        responses = service.handle([png(label_map(seed=s)) for s in range(3)] + [b"not an image"])
    finally:
        hook.remove()
    assert calls == [3]
    assert [r.status for r in responses] == [200, 200, 200, 400]
    assert len({r.body for r in responses[:3]}) == 3


def test_max_batch_splits_forward_passes():
    svc = SynthesisService(make_checkpoint(), precision="float32", max_batch=2)
    calls = []
    svc.synthesizer.generator.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    assert all(r.ok for r in svc.handle([png(label_map(seed=s)) for s in range(5)]))
    assert calls == [2, 2, 1]


def test_seed_and_style_select_the_style_of_a_multimodal_model(vae_service):
    label = base64.b64encode(png(label_map())).decode()
    style = base64.b64encode(png(np.full((20, 30, 3), (200, 30, 60), np.uint8))).decode()
    a, b, a2, styled = vae_service.handle(
        [
            {"label": label, "seed": 1},
            {"label": label, "seed": 2},
            {"label": label, "seed": "1"},
            {"label": label, "style": style},
        ]
    )
    assert a.body == a2.body and a.body != b.body and styled.body not in (a.body, b.body)
    # batched answers equal one-at-a-time answers
    [alone] = vae_service.handle([{"label": label, "seed": 2}])
    assert np.abs(decode(alone.body).astype(int) - decode(b.body)).max() <= 1


def test_instance_map_changes_the_output_of_an_instance_model():
    svc = SynthesisService(make_checkpoint(instance=True), precision="float32")
    label = np.zeros((32, 32), np.uint8)
    inst = np.zeros((32, 32), np.uint8)
    inst[:, 16:] = 1  # two instances of one class: an edge only the instance map shows
    plain, with_inst = svc.handle([png(label), {"label": png(label), "instance": png(inst)}])
    assert plain.ok and with_inst.ok and plain.body != with_inst.body


@pytest.mark.parametrize(
    ("payload", "status", "words"),
    [
        (b"", 400, "empty request"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400, "not a readable image"),
        (b"{not json", 400, "does not parse"),
        ({}, 400, "empty request"),
        ({"label": "%%%"}, 400, "base64"),
        ({"label": "aGVsbG8="}, 400, "not a readable image"),
        ({"label": {"url": "x"}}, 400, "b64"),
        ({"label": 5}, 400, "must be an image"),
        ({"seed": 1}, 400, "missing 'label'"),
        ({"label": "QQ==", "colour": 1, "zoom": 2}, 400, "'colour', 'zoom'"),
        ({"instances": []}, 400, "non-empty list"),
        ({"instances": [{"label": "QQ=="}], "extra": 1}, 400, "'extra'"),
        ({"instances": [7]}, 400, "instances[0]"),
        ([1, 2], 400, "not a list"),
    ],
)
def test_malformed_requests_are_4xx_with_a_reason(service, payload, status, words):
    [resp] = service.handle([payload])
    assert resp.status == status
    assert resp.content_type == "application/json"
    body = json.loads(resp.body)
    assert words in body["error"] and body["status"] == status


def test_content_errors_name_the_problem(service, vae_service):
    good = png(label_map())
    cases = [
        (png(np.zeros((8, 8, 3), np.uint8)), 400, "mode RGB"),
        (png(np.full((8, 8), 9, np.uint8)), 400, "label values 9"),
        ({"label": good, "instance": png(np.zeros((5, 5), np.uint8))}, 400, "must have the same size"),
        (png(np.zeros((201, 200), np.uint8)), 413, "40200 pixels"),
        ({"label": good, "output_size": [300, 300]}, 413, "'output_size' 300x300"),
        ({"label": good, "output_size": [0, 5]}, 400, "positive ints"),
        ({"label": good, "output_size": "big"}, 400, "WIDTHxHEIGHT"),
        ({"label": good, "seed": -1}, 400, "'seed'"),
        ({"label": good, "seed": "x"}, 400, "'seed' must be an integer"),
        ({"label": good, "style": good}, 400, "no image encoder"),
        ({"instances": [{"label": good}] * 17}, 413, "at most 16"),
    ]
    responses = service.handle([c[0] for c in cases])
    for (_, status, words), resp in zip(cases, responses, strict=True):
        assert resp.status == status, (words, resp.body)
        assert words in json.loads(resp.body)["error"]
    [resp] = vae_service.handle([{"label": good, "style": "aGVsbG8="}])
    assert resp.status == 400 and "'style' is not a readable image" in json.loads(resp.body)["error"]


def test_decompression_bombs_are_refused_before_decoding(service):
    # a 1-bit 20000x20000 PNG is tiny on the wire but would be 400 M pixels decoded
    bomb = png(np.zeros((20000, 20000), bool), mode="1")
    assert len(bomb) < 200_000
    [resp] = service.handle([bomb])
    assert resp.status == 413 and "400000000 pixels" in json.loads(resp.body)["error"]


def test_fuzzed_payloads_never_raise_and_good_requests_still_work(service):
    rng = random.Random(0)
    good = png(label_map())
    b64 = base64.b64encode(good).decode()
    payloads: list = []
    for i in range(150):
        kind = i % 5
        if kind == 0:
            payloads.append(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))))
        elif kind == 1:
            payloads.append(good[: rng.randint(1, len(good) - 1)])  # truncated PNG
        elif kind == 2:
            blob = bytearray(good)
            for _ in range(8):
                blob[rng.randrange(len(blob))] = rng.getrandbits(8)  # corrupted PNG
            payloads.append(bytes(blob))
        elif kind == 3:
            text = json.dumps({"label": b64, "seed": rng.randint(0, 9)})
            payloads.append(text[: rng.randint(1, len(text))].encode())  # truncated JSON
        else:
            payloads.append({"label": b64[: rng.randint(0, len(b64))], "seed": rng.choice([1, "2", None, [3], 4.5])})
    responses = service.handle(payloads)
    assert len(responses) == len(payloads)
    for resp in responses:
        if resp.status == 200:
            assert decode(resp.body).shape == (32, 32, 3)
        else:
            assert resp.status in (400, 413) and "error" in json.loads(resp.body)
    assert sum(r.status != 200 for r in responses) > 100
    assert service.handle([good])[0].status == 200


def test_describe_lists_classes_with_names_values_and_colours():
    names = ["sky", "cloud", "mountain", "water", "grass", "tree", "sand", "rock"]
    ckpt = make_checkpoint(meta={"class_names": names, "class_colours": [[i, i, i] for i in range(8)]})
    svc = SynthesisService(ckpt, precision="float32")
    [resp] = svc.handle([b'{"describe": true}'])
    info = json.loads(resp.body)
    assert [c["name"] for c in info["classes"]] == names
    assert info["classes"][3] == {"id": 3, "value": 3, "name": "water", "colour": [3, 3, 3]}
    assert (info["width"], info["height"], info["dontcare_value"]) == (32, 32, 255)
    assert class_names(make_checkpoint())[:2] == ["class 0", "class 1"]


def test_coco_class_names_and_ade20k_values():
    coco = Checkpoint(ModelConfig.from_preset("coco", ngf=4), {})
    assert class_names(coco)[0] == "person" and len(class_names(coco)) == 182
    ade = SynthesisService(make_checkpoint(label_offset=-1, label_nc=4), precision="float32")
    assert [c["value"] for c in ade.info()["classes"]] == [1, 2, 3, 4]
    # ADE20K files: 0 = unlabeled (don't care), 1..n = classes; n + 1 is out of range
    ok, bad = ade.handle([png(np.zeros((8, 8), np.uint8)), png(np.full((8, 8), 5, np.uint8))])
    assert ok.status == 200 and bad.status == 400


def test_bf16_output_is_close_to_float32():
    ckpt = make_checkpoint(ngf=16, crop_size=64)
    label = png(label_map(64, 64))
    exact = decode(SynthesisService(ckpt, precision="float32").handle([label])[0].body).astype(np.float64)
    fast = SynthesisService(ckpt, precision="bfloat16")
    assert fast.synthesizer.precision == "bfloat16"
    approx = decode(fast.handle([label])[0].body).astype(np.float64)
    psnr = 10 * np.log10(255**2 / ((exact - approx) ** 2).mean())
    assert psnr >= 25, psnr  # random weights; the trained-checkpoint bound (30 dB) is in test_serve_torchserve


class FakeContext:
    """What SpadeHandler uses of TorchServe's Context."""

    def __init__(self, model_dir, yaml_config=None):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.manifest = {"model": {"serializedFile": "model.pt"}}
        self.model_yaml_config = yaml_config or {}
        self.status: dict[int, tuple[int, str]] = {}
        self.headers: dict[int, dict[str, str]] = {}

    def set_response_status(self, code=200, phrase="", idx=0):
        self.status[idx] = (code, phrase)

    def set_response_content_type(self, idx, value):
        self.headers.setdefault(idx, {})["content-type"] = value

    def set_response_header(self, idx, key, value):
        self.headers.setdefault(idx, {})[key] = value


def test_handler_adapts_torchserve_rows_and_sets_status_per_request(tmp_path):
    make_checkpoint().save(tmp_path / "model.pt")
    ctx = FakeContext(tmp_path, {"handler": {"precision": "float32", "max_pixels": 10_000}})
    handler = SpadeHandler()
    handler.initialize(ctx)
    assert handler.service.max_pixels == 10_000 and handler.service.synthesizer.precision == "float32"
    good = png(label_map())
    rows = [{"body": good}, {"data": bytearray(b"junk")}, {"label": good, "seed": "3"}]
    out = handler.handle(rows, ctx)
    assert [ctx.status[i][0] for i in range(3)] == [200, 400, 200]
    assert ctx.headers[0]["content-type"] == "image/png" and ctx.headers[1]["content-type"] == "application/json"
    # two valid requests shared one forward pass; the bad one was in TorchServe's batch but not in it
    assert ctx.headers[0][BATCH_HEADER] == ctx.headers[2][BATCH_HEADER] == "2"
    assert BATCH_HEADER not in ctx.headers[1]
    assert decode(out[0]).shape == (32, 32, 3) and "error" in json.loads(out[1])


def test_batch_header_counts_the_images_of_each_forward_pass(tmp_path, monkeypatch):
    make_checkpoint().save(tmp_path / "model.pt")
    ctx = FakeContext(tmp_path, {"handler": {"precision": "float32", "max_batch": 2}})
    handler = SpadeHandler()
    handler.initialize(ctx)
    forwards: list[int] = []  # the batch size of every forward pass the synthesizer really ran
    real = handler.service.synthesizer.synthesize

    def counting(label, *args, **kwargs):
        forwards.append(label.shape[0])
        return real(label, *args, **kwargs)

    monkeypatch.setattr(handler.service.synthesizer, "synthesize", counting)
    good = png(label_map())
    handler.handle([{"body": good}] * 3 + [{"body": b'{"describe": true}'}], ctx)
    assert forwards == [2, 1]  # max_batch 2: three images in two forward passes
    assert [ctx.headers[i].get(BATCH_HEADER) for i in range(4)] == ["2", "2", "1", None]


def test_handler_rejects_unknown_settings(tmp_path):
    make_checkpoint().save(tmp_path / "model.pt")
    with pytest.raises(Exception, match="unknown handler setting.*colour"):
        SpadeHandler().initialize(FakeContext(tmp_path, {"handler": {"colour": 1}}))


def test_service_rejects_bad_settings():
    with pytest.raises(Exception, match="must be positive"):
        SynthesisService(make_checkpoint(), max_batch=0)
    with pytest.raises(Exception, match="unknown precision"):
        SynthesisService(make_checkpoint(), precision="fp8")


def test_request_error_is_a_client_error():
    err = RequestError("too big", 413)
    assert err.to_json() == {"error": "too big", "status": 413}


def test_bf16_fast_path_stays_within_30_db_of_float32_on_a_trained_model(tmp_path):
    """The serving default (bf16 fast path where native) against eager float32, on a briefly trained model."""
    from spade.config import Settings
    from spade.data.synthetic import generate_builtin_dataset
    from spade.train.loop import train
    from train_helpers import tiny_params

    data = generate_builtin_dataset(tmp_path / "data", count=32, val_count=8, size=32, progress=False)
    settings = Settings.from_dict(tiny_params(data, tmp_path / "run", train={"iterations": 40, "batch_size": 8}))
    model = train(settings, progress=False).final_model
    labels = [p.read_bytes() for p in sorted((data / "val_label").glob("*.png"))]
    exact = SynthesisService(model, precision="float32", fast=False).handle(labels)  # the eager reference
    fast_service = SynthesisService(model, precision="bfloat16")
    fast = fast_service.handle(labels)
    worst = min(
        10 * np.log10(255**2 / max(((decode(a.body).astype(float) - decode(b.body)) ** 2).mean(), 1e-12))
        for a, b in zip(exact, fast, strict=True)
    )
    assert worst >= 30, worst
    # the class names of the training data travel in the checkpoint
    assert [c["name"] for c in fast_service.info()["classes"]][:3] == ["sky", "cloud", "mountain"]
