"""`spade register`: store a TorchServe archive, register it in the MLflow Model Registry, promote it past a gate.

One call:

1. reads the archive (`.mar`, a zip made by torch-model-archiver): its manifest (model name and
   version) and the lineage in the meta of the project checkpoint inside it (training run, dataset
   fingerprint, git commit, iteration), and the evaluation's metrics.json (FID and mIoU);
2. uploads the archive to the model store (a folder or s3://bucket/prefix) under a name that carries
   its content hash, so that a stored archive is never replaced by a different one;
3. creates a version of the registered model with the metrics and the lineage as tags, linked to the
   training run when that run is on the tracking server (else to a new registration run), logs the
   metrics on that run, and points the alias `candidate` at the new version;
4. compares it with the version the alias `champion` points at (the gate below) and moves `champion`
   when it passes; the decision, its reason, both sets of numbers and the tolerances are recorded as
   tags of the new version, on the run, and returned (and written as JSON) for the pipeline;
5. with a TorchServe management URL, registers the archive there (a candidate too, so that it can be
   tried at /predictions/NAME/VERSION) and makes it the default version after a promotion.

The gate: lower FID is better, higher mIoU is better. A candidate passes when
FID <= champion FID + fid_tolerance and mIoU >= champion mIoU - miou_tolerance (the boundary
passes). Numbers are only compared when they were measured alike: a candidate scored on other data
than the champion (the evaluation's data fingerprint, in metrics.json and on the version) or with
another segmenter is not promoted, and neither is one that lacks a metric the champion has (absent, or
null like mIoU when no pixel was scored); the decision says which. A metric only the candidate has is
not compared (noted), but at least one must be: a candidate without FID and mIoU is refused, and one
that shares no metric with the champion is not promoted. A champion registered before the protocol was
recorded is compared on its numbers alone (noted). `force` promotes regardless (and says so). The
first version of a model (no champion yet) is promoted.

Model version sources: an MLflow server only accepts a local path as a source when it lies inside
the artifact folder of the version's run, and refuses http(s) URLs that are not its own artifact
store. So an archive in an object store (s3://...) is registered with its store URI as the source;
an archive in a local folder is also logged as an artifact of the linked run (under
`model-archive/`) and registered from `runs:/RUN_ID/model-archive/FILE`, which every server accepts
(and which the MLflow UI can download). The store URI is in the `archive_uri` tag either way. Should
a server refuse an object-store URI too (a source validation regex), the run artifact is used as well.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from spade.config import RegisterConfig, TrackingConfig, add_settings_arguments, load_settings, params_path
from spade.data.fingerprint import file_digest
from spade.errors import SpadeError
from spade.serve.torchserve_api import TOKEN_ENV, TorchServe
from spade.storage import Store, is_s3, local_file

CANDIDATE = "candidate"
CHAMPION = "champion"
ARCHIVE_ARTIFACT_PATH = "model-archive"
MANIFEST = "MAR-INF/MANIFEST.json"
GATE_METRICS = ("fid", "mIoU")
EPSILON = 1e-9  # float slack at the gate's boundary: a value exactly at the limit passes
LINEAGE_KEYS = ("git_commit", "dataset_fingerprint", "iteration", "source", "source_checkpoint", "mlflow_tracking_uri")

EXAMPLES = """examples:
  # archive from `spade package`, metrics from `spade evaluate`; store and tolerances from params.yaml
  spade register --mar dist/landscapes.mar --metrics evaluation/metrics.json
  # an S3 (or MinIO: AWS_ENDPOINT_URL) store, the decision as a file for the next pipeline step
  spade register --mar spade.mar --metrics metrics.json --store s3://models/spade --decision-out decision.json
  # register in TorchServe too (token: --torchserve-token or $TORCHSERVE_MANAGEMENT_TOKEN); default after promotion
  spade register --mar spade.mar --metrics metrics.json --torchserve-url http://127.0.0.1:8081
  # the training run is not in the archive (or is another one); promote whatever the gate says
  spade register --mar spade.mar --metrics metrics.json --run-id 3f2a... --force
"""


# --- the archive and the metrics ----------------------------------------------------------------


@dataclass
class Archive:
    """What a .mar says about itself: manifest name and version, and the checkpoint's lineage."""

    path: Path
    model_name: str
    version: str
    serialized_file: str
    sha256: str
    meta: dict = field(default_factory=dict)
    preset: str | None = None

    @property
    def lineage(self) -> dict:
        out = {k: self.meta[k] for k in LINEAGE_KEYS if self.meta.get(k) not in (None, "")}
        if self.meta.get("mlflow_run_id"):
            out["training_run_id"] = self.meta["mlflow_run_id"]
        if self.preset:
            out["preset"] = self.preset
        return out


def read_archive(path: str | Path) -> Archive:
    """Manifest and checkpoint lineage of a TorchServe archive (SpadeError naming the problem)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise SpadeError(f"archive not found: {path} (build one with `spade package` or torch-model-archiver)")
    if not zipfile.is_zipfile(path):
        raise SpadeError(
            f"{path} is not a model archive: not a zip file (torch-model-archiver's default format; "
            "--archive-format tgz or no-archive cannot be registered)"
        )
    where = f"{path}:{MANIFEST}"
    try:
        with zipfile.ZipFile(path) as zf:
            try:
                raw = zf.read(MANIFEST)
            except KeyError:
                raise SpadeError(
                    f"{path} has no {MANIFEST}: not a TorchServe archive; build it with `spade package` "
                    "or torch-model-archiver"
                ) from None
            try:
                manifest = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SpadeError(f"{where} is not valid JSON ({exc})") from None
            model = manifest.get("model") if isinstance(manifest, dict) else None
            if not isinstance(model, dict) or not model.get("modelName"):
                raise SpadeError(f"{where} names no model (model.modelName); rebuild the archive")
            serialized = model.get("serializedFile")
            if not serialized:
                raise SpadeError(
                    f"{where} names no serialized file (model.serializedFile): the archive must carry the "
                    "checkpoint (torch-model-archiver --serialized-file model.pt)"
                )
            if serialized not in zf.namelist():
                raise SpadeError(f"{path} lacks {serialized}, the serialized file its manifest names")
            with tempfile.TemporaryDirectory(prefix="spade-register-") as tmp:
                local = Path(tmp) / "checkpoint.pt"
                with zf.open(serialized) as src, local.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                try:
                    data = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
                except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same explanation
                    raise SpadeError(
                        f"cannot read {serialized} inside {path} as a project checkpoint "
                        f"({type(exc).__name__}: {str(exc)[:300]}); package a checkpoint from `spade train`"
                    ) from None
    except zipfile.BadZipFile as exc:
        raise SpadeError(f"{path} is a damaged zip file ({exc}); rebuild the archive") from None
    if not isinstance(data, dict):
        raise SpadeError(f"{serialized} inside {path} is not a SPADE project checkpoint (a {type(data).__name__})")
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    return Archive(
        path=path,
        model_name=str(model["modelName"]),
        version=str(model.get("modelVersion") or "1.0"),  # TorchServe's default when the manifest has none
        serialized_file=str(serialized),
        sha256=file_digest(path),
        meta={k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))},
        preset=config.get("preset"),
    )


def _number(value: object, key: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpadeError(f"{where}: {key} must be a number (or null), got {value!r}")
    if not math.isfinite(value):
        raise SpadeError(f"{where}: {key} is {value}, not a finite number; re-run the evaluation")
    return float(value)


def _metrics_data(metrics: str | Path | dict) -> tuple[dict, str]:
    """An evaluation's metrics (a dict, or its metrics.json) and what to call it in messages."""
    if isinstance(metrics, dict):
        return metrics, "metrics"
    path = Path(metrics)
    if not path.is_file():
        raise SpadeError(f"metrics file not found: {path} (`spade evaluate --out DIR` writes DIR/metrics.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpadeError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SpadeError(f"{path}: expected a JSON object of metrics, got a {type(data).__name__}")
    return data, str(path)


def read_metrics(metrics: str | Path | dict, *, fid_key: str = "fid", miou_key: str = "mIoU") -> tuple[dict, dict]:
    """(gate metrics {'fid': x | None, 'mIoU': y | None}, every top-level number) of an evaluation's metrics."""
    data, where = _metrics_data(metrics)
    gate = {"fid": _number(data.get(fid_key), fid_key, where), "mIoU": _number(data.get(miou_key), miou_key, where)}
    scalars = {
        k: float(v)
        for k, v in data.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "seconds"
    }
    return gate, scalars


# --- the gate -----------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:.6g}"


PROTOCOL_KEYS = {"data_fingerprint": "data", "segmenter": "segmenter", "segmenter_weights": "segmenter weights"}


def read_protocol(metrics: str | Path | dict) -> dict:
    """How an evaluation's numbers were measured: {'data_fingerprint', 'segmenter', 'segmenter_weights',
    'split'} (None where the metrics do not say, as in files written before they did)."""
    data, _ = _metrics_data(metrics)
    evaluated = data.get("data") if isinstance(data.get("data"), dict) else {}
    text = {k: data.get(k) if isinstance(data.get(k), str) else None for k in ("segmenter", "segmenter_weights")}
    return {"data_fingerprint": evaluated.get("fingerprint") or None, **text, "split": evaluated.get("split") or None}


def gate(
    candidate: dict,
    champion: dict | None,
    *,
    fid_tolerance: float,
    miou_tolerance: float,
    champion_version: str | None = None,
    candidate_protocol: dict | None = None,
    champion_protocol: dict | None = None,
) -> dict:
    """Whether `candidate` ({'fid', 'mIoU'}) may replace `champion` (None: there is none yet).

    The protocols ({'data_fingerprint', 'segmenter'}, see read_protocol) must agree where both are known.
    Returns {'passed', 'reason', 'checks': [{metric, candidate, champion, tolerance, limit, passed}], 'skipped'}.
    """
    if champion is None:
        return {"passed": True, "reason": "no champion yet: the first version is promoted", "checks": [], "skipped": []}
    who = f"champion v{champion_version}" if champion_version else "the champion"
    checks, skipped, refusals = [], [], []
    mine, theirs = candidate_protocol or {}, champion_protocol or {}
    for key, what in PROTOCOL_KEYS.items():
        new, old = mine.get(key), theirs.get(key)
        if new and old and new != old:
            shown = (new[:12], old[:12]) if key == "data_fingerprint" else (new, old)
            refusals.append(
                f"scored on other {what} than {who} ({shown[0]} vs {shown[1]}): the numbers are not comparable; "
                "evaluate the candidate as the champion was"
            )
        elif new and not old:
            skipped.append(f"the {what} {who} was scored on is not recorded: compared on the numbers alone")
        elif old and not new:
            refusals.append(
                f"the {what} the candidate was scored on is not recorded, while that of {who} is: evaluate it "
                "with `spade evaluate`, whose metrics.json records it"
            )
    for metric in GATE_METRICS:
        new, old = candidate.get(metric), champion.get(metric)
        if old is None:
            skipped.append(f"{metric} not compared (missing for {who if new is not None else 'both'})")
            continue
        if new is None:
            refusals.append(f"the candidate has no {metric}, which {who} has ({_fmt(old)})")
            continue
        if metric == "fid":  # lower is better
            limit = old + fid_tolerance
            ok = new <= limit + EPSILON
            text = f"FID {_fmt(new)} {'<=' if ok else '>'} {_fmt(limit)} ({who} {_fmt(old)} + {_fmt(fid_tolerance)})"
            tolerance = fid_tolerance
        else:  # higher is better
            limit = old - miou_tolerance
            ok = new >= limit - EPSILON
            text = f"mIoU {_fmt(new)} {'>=' if ok else '<'} {_fmt(limit)} ({who} {_fmt(old)} - {_fmt(miou_tolerance)})"
            tolerance = miou_tolerance
        checks.append(
            {"metric": metric, "candidate": new, "champion": old, "tolerance": tolerance, "limit": limit}
            | {"passed": ok, "text": text}
        )
    notes = f"; {'; '.join(skipped)}" if skipped else ""
    if refusals:
        return {
            "passed": False,
            "reason": "not comparable with " + who + ": " + "; ".join(refusals) + notes,
            "checks": checks,
            "skipped": skipped,
        }
    if not checks:
        return {
            "passed": False,
            "reason": f"nothing to compare with {who}: no metric is known for both (fid, mIoU){notes}",
            "checks": [],
            "skipped": skipped,
        }
    failed = [c["text"] for c in checks if not c["passed"]]
    if failed:
        reason = "worse than " + who + ": " + "; ".join(failed) + notes
    else:
        reason = "passes the gate against " + who + ": " + "; ".join(c["text"] for c in checks) + notes
    return {"passed": not failed, "reason": reason, "checks": checks, "skipped": skipped}


# --- TorchServe ---------------------------------------------------------------------------------


def archive_url_for_torchserve(archive_uri: str, file_name: str, explicit: str | None = None) -> str:
    """What TorchServe is asked to load: the explicit URL, else the store URI when TorchServe can fetch it
    (http/https), else the file name (TorchServe's model store is then the same folder or bucket prefix)."""
    if explicit:
        return explicit
    if archive_uri.startswith(("http://", "https://")):
        return archive_uri
    return file_name


# --- MLflow -------------------------------------------------------------------------------------


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", "") or "")


def _not_found(exc: Exception) -> bool:
    return _error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _mlflow_error(uri: str, what: str, exc: Exception) -> SpadeError:
    from mlflow.exceptions import MlflowException

    text = str(exc)
    unreachable = isinstance(exc, OSError) or any(
        word in text for word in ("Max retries exceeded", "Connection refused", "ConnectionError", "timed out")
    )
    if not unreachable:
        message = exc.message if isinstance(exc, MlflowException) else text
        return SpadeError(f"MLflow at {uri} could not {what}: {message[:1000]}")
    return SpadeError(
        f"cannot reach MLflow at {uri} to {what} ({type(exc).__name__}: {text[:300]}); start the tracking "
        "server or point --tracking-uri (or $MLFLOW_TRACKING_URI, or tracking.tracking_uri) at it"
    )


def resolve_registry_uri(explicit: str | None, tracking: TrackingConfig, meta: dict) -> str:
    """--tracking-uri, else tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else the training run's
    URI from the checkpoint, else ./mlruns.db (SQLite) as `spade train` uses."""
    from spade.train.tracking import resolve_tracking_uri

    if explicit:
        return explicit
    if tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return resolve_tracking_uri(tracking)
    return str(meta.get("mlflow_tracking_uri") or "") or resolve_tracking_uri(tracking)


def _model_version_metrics(mv) -> dict:  # noqa: ANN001
    out = {}
    for metric in GATE_METRICS:
        raw = (mv.tags or {}).get(f"metric.{metric}")
        try:
            value = float(raw) if raw not in (None, "", "None") else None
        except ValueError:
            value = None
        out[metric] = value if value is not None and math.isfinite(value) else None
    return out


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"


def archive_file_name(name: str, version: str, sha256: str) -> str:
    """The stored name of an archive: it changes with its content, so a stored file is never replaced."""
    return f"{_safe_name(name)}-{_safe_name(version)}-{sha256[:12]}.mar"


def _kserve_layout(archive: Archive, explicit: str | Path | None) -> Path | None:
    """The KServe layout to store with `archive`: `explicit`, else the `kserve/` folder `spade package` wrote
    beside it. It must hold config/config.properties and model-store/*.mar with this very archive."""
    folder = Path(explicit) if explicit else archive.path.parent / "kserve"
    if not folder.is_dir():
        if explicit:
            raise SpadeError(f"--kserve {folder}: no such folder (spade package writes OUT/kserve beside OUT/NAME.mar)")
        return None
    config = folder / "config" / "config.properties"
    mars = sorted((folder / "model-store").glob("*.mar"))
    problem = None
    if not config.is_file() or len(mars) != 1:
        problem = f"{folder} is not a KServe layout: expected config/config.properties and one model-store/*.mar"
    elif file_digest(mars[0]) != archive.sha256:
        problem = f"{mars[0]} is not the archive being registered ({archive.path}): package them together"
    if problem is None:
        return folder
    if explicit:
        raise SpadeError(problem)
    _say(f"note: no KServe layout stored with this version ({problem}; pass --kserve DIR)")
    return None


def _store_kserve_layout(folder: Path, store: str, stem: str) -> str:
    """Copy the layout to STORE/STEM/kserve/ (config/ and model-store/); returns that folder's URI."""
    base = f"{store.rstrip('/')}/{stem}/kserve"
    for sub in ("config", "model-store"):
        for path in sorted((folder / sub).iterdir()):
            if path.is_file():
                Store(f"{base}/{sub}").put(path, path.name)
    return base if is_s3(base) else str(Path(base).resolve())


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def register(
    *,
    mar: str | Path,
    metrics: str | Path | dict,
    run_id: str | None = None,
    model_name: str | None = None,
    store: str | None = None,
    fid_tolerance: float | None = None,
    miou_tolerance: float | None = None,
    force: bool = False,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    torchserve_url: str | None = None,
    torchserve_token: str | None = None,
    torchserve_archive_url: str | None = None,
    decision_out: str | Path | None = None,
    config: RegisterConfig | None = None,
    tracking: TrackingConfig | None = None,
    kserve: str | Path | None = None,
) -> dict:
    """Store `mar`, register it as a new version with `metrics` and its lineage, gate it against the champion.

    `kserve`: the KServe layout of the same archive (config/config.properties + model-store/NAME.mar, what
    `spade package` writes beside the .mar, found there when not given); it is stored next to the archive
    and its URI recorded on the version (`kserve_uri`): what an InferenceService's storageUri points at.

    Arguments left None come from `config` (params.yaml's `register:` section) and `tracking`
    (`tracking:`: tracking_uri, experiment). Returns the decision (also written to `decision_out` as JSON):
    model_name, version, decision ('promoted' or 'candidate'), promoted, forced, gate_passed, reason,
    aliases, champion, previous_champion, candidate, metrics, checks, skipped, tolerances, archive, source,
    lineage, mlflow, torchserve, time. Raises SpadeError for bad input, an unreachable MLflow, or a TorchServe
    refusal (after recording the decision, which then is 'candidate' when TorchServe could not load it).
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    overrides = {
        "model_name": model_name,
        "store": store,
        "fid_tolerance": fid_tolerance,
        "miou_tolerance": miou_tolerance,
        "torchserve_url": torchserve_url,
    }
    cfg = dataclasses.replace(config or RegisterConfig(), **{k: v for k, v in overrides.items() if v is not None})
    tcfg = tracking or TrackingConfig()
    if experiment:
        tcfg = dataclasses.replace(tcfg, experiment=experiment)

    with tempfile.TemporaryDirectory(prefix="spade-register-") as tmp:
        # everything that can be wrong with the inputs is found before anything is written
        archive = read_archive(local_file(mar, Path(tmp), "archive"))
        layout = _kserve_layout(archive, kserve)
        if not isinstance(metrics, dict):
            metrics = local_file(metrics, Path(tmp), "metrics file")
        candidate, scalars = read_metrics(metrics, fid_key=cfg.fid_key, miou_key=cfg.miou_key)
        if candidate["fid"] is None and candidate["mIoU"] is None and not force:
            where = "the metrics" if isinstance(metrics, dict) else str(metrics)
            raise SpadeError(
                f"{where} has neither {cfg.fid_key!r} nor {cfg.miou_key!r} (or both are null), so the version "
                "cannot be gated; evaluate it first (spade evaluate), set register.fid_key / register.miou_key to "
                "the keys it uses, or register it anyway with --force"
            )
        token = torchserve_token or os.environ.get(TOKEN_ENV) or None
        registration = _Registration(
            archive=archive,
            candidate=candidate,
            scalars=scalars,
            protocol=read_protocol(metrics),
            kserve=layout,
            name=cfg.model_name or archive.model_name,
            uri=resolve_registry_uri(tracking_uri, tcfg, archive.meta),
            cfg=cfg,
            experiment=tcfg.experiment,
            force=force,
            tmp=Path(tmp),
        )
        return registration.run(
            training_run_id=run_id or archive.meta.get("mlflow_run_id") or None,
            explicit_run=bool(run_id),
            torchserve=TorchServe(cfg.torchserve_url, token, cfg.torchserve_timeout) if cfg.torchserve_url else None,
            torchserve_archive_url=torchserve_archive_url,
            decision_out=decision_out,
        )


@dataclass
class _Registration:
    """The steps of one registration, sharing the client and what earlier steps found."""

    archive: Archive
    candidate: dict
    scalars: dict
    protocol: dict
    kserve: Path | None
    name: str
    uri: str
    cfg: RegisterConfig
    experiment: str
    force: bool
    tmp: Path
    model_exists: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)

    def call(self, what: str, fn, *args, **kwargs):  # noqa: ANN001, ANN201
        """An MLflow call whose failure becomes a SpadeError saying what was being done and where."""
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except (MlflowException, OSError) as exc:  # OSError: requests' connection errors
            raise _mlflow_error(self.uri, what, exc) from None

    def lookup(self, what: str, fn, *args):  # noqa: ANN001, ANN201
        """Like `call`, but None when MLflow says the thing does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args)
        except MlflowException as exc:
            if _not_found(exc):
                return None
            raise _mlflow_error(self.uri, what, exc) from None
        except OSError as exc:
            raise _mlflow_error(self.uri, what, exc) from None

    def run(
        self,
        *,
        training_run_id: str | None,
        explicit_run: bool,
        torchserve: TorchServe | None,
        torchserve_archive_url: str | None,
        decision_out: str | Path | None,
    ) -> dict:
        name, cfg, client = self.name, self.cfg, self.client
        # 1. the registry answers; the champion and the training run (when on this server) are read
        registered = self.lookup(f"read registered model {name!r}", client.get_registered_model, name)
        self.model_exists = registered is not None
        champion_version, previous, champion_protocol = None, None, None
        if registered is not None and (registered.aliases or {}).get(CHAMPION) is not None:
            champion_version = str(registered.aliases[CHAMPION])
            champion = self.call(
                f"read version {champion_version} of {name!r}", client.get_model_version, name, champion_version
            )
            previous = {"version": champion_version, **_model_version_metrics(champion)}
            champion_protocol = {k: (champion.tags or {}).get(f"eval.{k}") or None for k in PROTOCOL_KEYS}
        run = None
        if training_run_id:
            run = self.lookup(f"read run {training_run_id}", client.get_run, training_run_id)
            if run is None and explicit_run:
                raise SpadeError(f"--run-id {training_run_id}: no such run at {self.uri}")
            if run is None:
                _say(
                    f"note: training run {training_run_id} (from the archive) is not at {self.uri}; the version is "
                    "linked to a registration run and carries the training run id as a tag"
                )

        # 2. the gate (against the champion as it was before this version)
        result = gate(
            self.candidate,
            None if previous is None else {k: previous[k] for k in GATE_METRICS},
            fid_tolerance=cfg.fid_tolerance,
            miou_tolerance=cfg.miou_tolerance,
            champion_version=champion_version,
            candidate_protocol=self.protocol,
            champion_protocol=champion_protocol,
        )
        promoted = result["passed"] or self.force
        reason = result["reason"]
        if self.force:
            reason = f"forced (--force{'; the gate passes too' if result['passed'] else ''}): {reason}"

        # 3. the archive goes to the store, under a name that changes with its content
        store = Store(cfg.store)
        file_name = archive_file_name(name, self.archive.version, self.archive.sha256)
        archive_uri = store.put(self.archive.path, file_name)
        if not store.s3:
            archive_uri = str(Path(archive_uri).resolve())
        _say(f"stored {self.archive.path} as {archive_uri}")
        kserve_uri = None
        if self.kserve is not None:
            kserve_uri = _store_kserve_layout(self.kserve, cfg.store, file_name.removesuffix(".mar"))
            _say(f"stored its KServe layout as {kserve_uri}")

        lineage = self.archive.lineage
        if training_run_id:
            lineage["training_run_id"] = training_run_id
        decision = {
            "model_name": name,
            "version": None,
            "decision": "promoted" if promoted else "candidate",
            "promoted": promoted,
            "forced": self.force,
            "gate_passed": result["passed"],
            "reason": reason,
            "aliases": [CANDIDATE, CHAMPION] if promoted else [CANDIDATE],
            "champion": None if promoted else champion_version,
            "previous_champion": previous,
            "candidate": dict(self.candidate),
            "protocol": dict(self.protocol),
            "metrics": self.scalars,
            "checks": [{k: v for k, v in c.items() if k != "text"} for c in result["checks"]],
            "skipped": result["skipped"],
            "tolerances": {"fid": cfg.fid_tolerance, "mIoU": cfg.miou_tolerance},
            "archive": {
                "uri": archive_uri,
                "file": file_name,
                "sha256": self.archive.sha256,
                "mar_model_name": self.archive.model_name,
                "mar_version": self.archive.version,
                "kserve_uri": kserve_uri,
            },
            "source": None,
            "lineage": lineage,
            "mlflow": {"tracking_uri": self.uri, "run_id": None, "registration_run": run is None},
            "torchserve": None,
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }

        # 4. the version, linked to the training run, else to a registration run that is ended here
        if run is not None:
            return self.finish(
                decision, run.info.run_id, run.data.metrics, store, torchserve, torchserve_archive_url, decision_out
            )
        tags = {"mlflow.runName": f"register-{name}", "spade.stage": "registration"}
        run_id = self.call(f"create a registration run in experiment {self.experiment!r}", self.registration_run, tags)
        status = "FAILED"
        try:
            decision = self.finish(decision, run_id, {}, store, torchserve, torchserve_archive_url, decision_out)
            status = "FINISHED"
            return decision
        finally:
            try:
                with contextlib.redirect_stdout(sys.stderr):  # MLflow prints the run's link: stdout is for JSON
                    self.client.set_terminated(run_id, status=status)
            except Exception as exc:  # noqa: BLE001 - the registration itself is done, or failed already
                _say(f"warning: could not end registration run {run_id} ({type(exc).__name__}: {exc})")

    def registration_run(self, tags: dict) -> str:
        from spade.train.tracking import DEFAULT_ARTIFACTS

        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            exp_id = exp.experiment_id
        else:  # as `spade train` creates it: next to ./mlruns.db when the store is that SQLite file
            local = self.uri.startswith("sqlite:")
            location = (Path.cwd() / DEFAULT_ARTIFACTS).resolve().as_uri() if local else None
            exp_id = self.client.create_experiment(self.experiment, artifact_location=location)
        return self.client.create_run(exp_id, tags=tags).info.run_id

    def finish(
        self,
        decision: dict,
        run_id: str,
        run_metrics: dict,
        store: Store,
        torchserve: TorchServe | None,
        torchserve_archive_url: str | None,
        decision_out: str | Path | None,
    ) -> dict:
        from mlflow.entities import Metric, RunTag
        from mlflow.exceptions import MlflowException

        name, client, archive = self.name, self.client, self.archive
        decision["mlflow"]["run_id"] = run_id
        file_name = decision["archive"]["file"]

        def run_copy() -> str:
            """The archive as an artifact of the run, which every server accepts as a version's source."""
            local = self.tmp / "artifact" / file_name
            local.parent.mkdir(exist_ok=True)
            shutil.copyfile(archive.path, local)
            self.call(
                f"log {file_name} on run {run_id}", client.log_artifact, run_id, str(local), ARCHIVE_ARTIFACT_PATH
            )
            return f"runs:/{run_id}/{ARCHIVE_ARTIFACT_PATH}/{file_name}"

        # 5. the version: lineage, metrics and the decision as tags; the alias `candidate`
        tags = {
            **{k: str(v) for k, v in decision["lineage"].items()},
            "archive_uri": decision["archive"]["uri"],
            "archive_sha256": archive.sha256,
            "archive_file": file_name,
            **({"kserve_uri": decision["archive"]["kserve_uri"]} if decision["archive"]["kserve_uri"] else {}),
            "mar_model_name": archive.model_name,
            "mar_version": archive.version,
            **{f"metric.{k}": str(v) for k, v in self.scalars.items()},
            **{f"metric.{k}": str(v) for k, v in self.candidate.items() if v is not None},
            **{f"eval.{k}": str(v) for k, v in self.protocol.items() if v},
            **_decision_tags(decision),
        }
        if not self.model_exists:
            try:
                client.create_registered_model(name, description="SPADE semantic image synthesis (spade register)")
            except MlflowException as exc:
                if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":  # created meanwhile by another registration
                    raise _mlflow_error(self.uri, f"create registered model {name!r}", exc) from None
            except OSError as exc:
                raise _mlflow_error(self.uri, f"create registered model {name!r}", exc) from None
        what = f"create a version of {name!r}"
        description = _description(decision)
        source = decision["archive"]["uri"] if store.s3 else run_copy()
        try:
            mv = client.create_model_version(name, source, run_id=run_id, tags=tags, description=description)
        except MlflowException as exc:
            if not store.s3 or _error_code(exc) != "INVALID_PARAMETER_VALUE" or "source" not in str(exc):
                raise _mlflow_error(self.uri, what, exc) from None
            _say(f"note: MLflow at {self.uri} does not take {source} as a source; registering the run's copy")
            source = run_copy()
            mv = self.call(
                what, client.create_model_version, name, source, run_id=run_id, tags=tags, description=description
            )
        except OSError as exc:
            raise _mlflow_error(self.uri, what, exc) from None
        version = str(mv.version)
        decision.update(version=version, source=source)
        if decision["promoted"]:
            decision["champion"] = version
        _say(f"registered {name} version {version} from {source}")
        self.call(f"set alias {CANDIDATE!r}", client.set_registered_model_alias, name, CANDIDATE, version)

        # 6. TorchServe takes the version (a candidate too); promotion moves `champion`, then TorchServe's default
        error = None
        if torchserve is not None:
            error = self.torchserve_register(decision, torchserve, torchserve_archive_url)
        if decision["promoted"]:
            self.call(f"set alias {CHAMPION!r}", client.set_registered_model_alias, name, CHAMPION, version)
            if torchserve is not None:
                try:
                    torchserve.set_default(name, archive.version)
                    decision["torchserve"]["default"] = True
                    _say(f"TorchServe: {name} version {archive.version} is the default")
                except SpadeError as exc:
                    decision["torchserve"]["error"] = str(exc)
                    error = SpadeError(
                        f"{exc}; version {version} is the registry's champion: retry with "
                        f"curl -X PUT {torchserve.url}/models/{name}/{archive.version}/set-default"
                    )

        # 7. the record: the final decision on the version, the numbers and outcome on the run, the JSON file
        final = _decision_tags(decision)
        changed = {k: v for k, v in final.items() if tags.get(k) != v}
        for key, value in changed.items():
            self.call(f"tag version {version} of {name!r}", client.set_model_version_tag, name, version, key, value)
        if _description(decision) != description:
            self.call(
                f"describe version {version} of {name!r}",
                client.update_model_version,
                name,
                version,
                _description(decision),
            )
        stamp = int(time.time() * 1000)
        step = int(archive.meta.get("iteration") or 0)
        metrics = [
            Metric(f"eval_{key}", value, stamp, step)
            for key, value in self.scalars.items()
            if run_metrics.get(f"eval_{key}") != value  # `spade evaluate` may have logged them already
        ]
        run_tags = {
            "spade.registered_model": name,
            "spade.registered_version": version,
            "spade.registration_decision": decision["decision"],
        }
        self.call(
            f"log the registration on run {run_id}",
            client.log_batch,
            run_id,
            metrics=metrics,
            tags=[RunTag(k, v) for k, v in run_tags.items()],
        )
        decision_file = self.tmp / f"decision-v{version}.json"
        decision_file.write_text(json.dumps(decision, indent=2, sort_keys=True) + "\n")
        self.call(f"log the decision on run {run_id}", client.log_artifact, run_id, str(decision_file), "registration")
        if decision_out:
            out = Path(decision_out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(decision, indent=2, sort_keys=True) + "\n")
        if error is not None:
            raise error
        _say(f"{name} version {version}: {decision['decision']} ({decision['reason']})")
        return decision

    def torchserve_register(
        self, decision: dict, torchserve: TorchServe, explicit_url: str | None
    ) -> SpadeError | None:
        """Register in TorchServe; a failure keeps the version a candidate (the error is returned, for later)."""
        archive_url = archive_url_for_torchserve(decision["archive"]["uri"], decision["archive"]["file"], explicit_url)
        info = {
            "url": torchserve.url,
            "model_name": self.name,
            "version": self.archive.version,
            "archive_url": archive_url,
            "registered": False,
            "already_registered": False,
            "default": False,
        }
        decision["torchserve"] = info
        try:
            fresh = torchserve.register(archive_url, self.name)
        except SpadeError as exc:
            info["error"] = str(exc)
            if decision["promoted"]:
                champion = decision["previous_champion"]
                decision.update(
                    decision="candidate",
                    promoted=False,
                    aliases=[CANDIDATE],
                    champion=champion["version"] if champion else None,
                    reason=f"not promoted: TorchServe could not load it ({exc}); gate: {decision['reason']}",
                )
            return exc
        info.update(registered=True, already_registered=not fresh)
        if fresh:
            _say(f"TorchServe: registered {self.name} version {self.archive.version}")
        else:
            _say(
                f"warning: TorchServe already has {self.name} version {self.archive.version}; it keeps the archive "
                "registered then (give each archive its own version: torch-model-archiver --version)"
            )
        return None


def _decision_tags(decision: dict) -> dict:
    previous = decision["previous_champion"]
    tags = {
        "decision": decision["decision"],
        "decision.reason": decision["reason"],
        "decision.forced": str(decision["forced"]).lower(),
        "decision.gate_passed": str(decision["gate_passed"]).lower(),
        "decision.champion_before": previous["version"] if previous else "none",
        "decision.fid_tolerance": str(decision["tolerances"]["fid"]),
        "decision.miou_tolerance": str(decision["tolerances"]["mIoU"]),
        "decision.time": decision["time"],
    }
    for metric in GATE_METRICS:
        if previous and previous.get(metric) is not None:
            tags[f"decision.champion_{metric}"] = str(previous[metric])
    return tags


def _description(decision: dict) -> str:
    numbers = ", ".join(f"{k} {_fmt(v)}" for k, v in decision["candidate"].items() if v is not None)
    return f"{decision['decision']}: {numbers or 'no metrics'}. {decision['reason']}"


# --- the command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mar", required=True, help="the TorchServe archive (.mar): a path or s3:// URI")
    parser.add_argument("--metrics", required=True, help="the evaluation's metrics.json: a path or s3:// URI")
    parser.add_argument("--run-id", help="MLflow run that trained the model (default: the one in the archive)")
    parser.add_argument("--model-name", help="registered model name (default: register.model_name, else the .mar's)")
    parser.add_argument("--store", help="model store: a folder or s3://bucket/prefix (default: register.store)")
    parser.add_argument("--fid-tolerance", type=float, help="promote when FID <= champion FID + this")
    parser.add_argument("--miou-tolerance", type=float, help="promote when mIoU >= champion mIoU - this")
    parser.add_argument("--force", action="store_true", help="promote to champion whatever the gate says")
    parser.add_argument("--decision-out", type=Path, help="write the decision here as JSON (default: print it)")
    parser.add_argument(
        "--kserve",
        type=Path,
        help="the archive's KServe layout, stored beside it (default: the kserve/ folder next to --mar, if any)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking server (default: tracking.tracking_uri, $MLFLOW_TRACKING_URI, the training run's, "
        "./mlruns.db)",
    )
    parser.add_argument("--experiment", help="experiment of the registration run when the training run is unknown")
    parser.add_argument(
        "--torchserve-url",
        help="TorchServe management API, e.g. http://127.0.0.1:8081 (the shipped configuration binds it to loopback)",
    )
    parser.add_argument("--torchserve-token", help=f"TorchServe management key (default: ${TOKEN_ENV})")
    parser.add_argument(
        "--torchserve-archive-url",
        help="URL (or model-store file name) TorchServe loads the archive from (default: the store URI when "
        "http(s), else the archive's file name in the store)",
    )
    add_settings_arguments(parser, example="register.fid_tolerance=1.0")


def main(args: argparse.Namespace) -> int:
    settings = load_settings(params_path(args.params), args.overrides)
    decision = register(
        mar=args.mar,
        metrics=args.metrics,
        run_id=args.run_id,
        model_name=args.model_name,
        store=args.store,
        fid_tolerance=args.fid_tolerance,
        miou_tolerance=args.miou_tolerance,
        force=args.force,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        torchserve_url=args.torchserve_url,
        torchserve_token=args.torchserve_token,
        torchserve_archive_url=args.torchserve_archive_url,
        decision_out=args.decision_out,
        config=settings.register,
        tracking=settings.tracking,
        kserve=args.kserve,
    )
    if args.decision_out:
        summary = f"{decision['model_name']} version {decision['version']}: {decision['decision']}"
        print(f"{summary}; decision in {args.decision_out}")
    else:
        print(json.dumps(decision, indent=2, sort_keys=True))
    return 0
