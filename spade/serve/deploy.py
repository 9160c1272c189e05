"""`spade deploy`: make a model version live behind a running TorchServe, with no request dropped.

The swap, in order (each step only after the one before it succeeded):

1. the archive is put where the server loads archives from: copied into `--model-store` (the server's
   model store folder, for a server on this machine; written under a new name, then renamed) or handed
   over as a URL the server may fetch (`--archive-url`);
2. it is registered as a new version of its model (the version in its manifest), and its workers are
   waited for until every one is READY; with `--inference-url`, one request is sent to that version and
   must answer with an image;
3. it is made the model's default version: from then on requests to /predictions/NAME go to it;
4. after `--drain` seconds (requests queued on the old version finish; where the server reports its
   queue, until it is empty as well), the previous default version is unregistered (`--keep-previous`:
   it stays, for a quick switch back).

On a failure before step 3 the new version is unregistered again (when this command registered it) and
its copied file removed, so the old version stays default and serving; the command exits non-zero with
the reason. Deploying the archive that is already the default version does nothing and says so; a
different archive under a version the server already has is refused (versions name archives).

The archive is a path, an s3:// URI, or the registered model version of an MLflow alias (`--model NAME
--alias champion`: the `archive_uri` that `spade register` recorded on the version, its sha256 checked).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from spade.data.fingerprint import file_digest
from spade.errors import SpadeError
from spade.serve.torchserve_api import TOKEN_ENV, TorchServe
from spade.storage import Store, local_file

INFERENCE_TOKEN_ENV = "TORCHSERVE_INFERENCE_TOKEN"

EXAMPLES = f"""examples:
  # a TorchServe on this machine, its model store the folder dist/store
  spade deploy --mar dist/landscapes.mar --torchserve-url http://127.0.0.1:8081 --model-store dist/store
  # the champion of the MLflow Model Registry, checked with one request before the switch
  spade deploy --model landscapes --alias champion --tracking-uri http://mlflow:5000 \\
      --torchserve-url http://127.0.0.1:8081 --model-store /srv/model-store --inference-url http://127.0.0.1:8080
  # a server that fetches archives itself (its allowed_urls must admit the URL)
  spade deploy --mar dist/landscapes.mar --archive-url https://models.example.org/landscapes-2.mar \\
      --torchserve-url http://127.0.0.1:8081

Keys: --torchserve-token or ${TOKEN_ENV} (management), --inference-token or ${INFERENCE_TOKEN_ENV}.
"""


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- where the archive comes from


def resolve_registered_archive(model: str, alias: str, tracking_uri: str) -> dict:
    """The archive of the version that `alias` (or a version number) points at in the MLflow registry:
    {"uri", "sha256", "version", "model"}; SpadeError naming what is missing."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        if alias.isdigit():
            mv = client.get_model_version(model, alias)
        else:
            mv = client.get_model_version_by_alias(model, alias)
    except MlflowException as exc:
        if str(getattr(exc, "error_code", "")) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise SpadeError(
                f"MLflow at {tracking_uri} could not look up {model!r} {alias!r}: {exc.message[:300]}"
            ) from None
        raise SpadeError(
            f"MLflow at {tracking_uri} has no version {alias!r} of registered model {model!r} ({exc.message[:300]}); "
            "`spade register` creates versions and sets the aliases candidate and champion"
        ) from None
    except OSError as exc:
        raise SpadeError(f"cannot reach MLflow at {tracking_uri} ({exc}); check --tracking-uri") from None
    tags = mv.tags or {}
    uri = tags.get("archive_uri")
    if not uri:
        raise SpadeError(
            f"version {mv.version} of {model!r} has no archive_uri tag: it was not registered by `spade register`"
        )
    return {"uri": uri, "sha256": tags.get("archive_sha256"), "version": str(mv.version), "model": model}


# --------------------------------------------------------------------------- the swap


def _place(archive: Path, model_store: Path, file_name: str) -> tuple[Path, bool]:
    """The archive in the server's model store under `file_name`; True when this call wrote it."""
    if not model_store.is_dir():
        raise SpadeError(f"--model-store {model_store} is not a folder (the TorchServe model store)")
    target = model_store / file_name
    if target.is_file() and file_digest(target) == file_digest(archive):
        return target, False
    return Path(Store(model_store).put(archive, file_name)), True


def probe_png() -> bytes:
    """A 64x64 label map of class value 0 (valid for every preset): what the check request sends."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (64, 64), 0).save(buf, format="PNG")
    return buf.getvalue()


def probe(inference_url: str, model_name: str, version: str, token: str | None, timeout: float) -> None:
    """One request to exactly this version; SpadeError unless it answers 200 with a PNG."""
    url = f"{inference_url.rstrip('/')}/predictions/{model_name}/{version}"
    headers = {"Content-Type": "image/png"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=probe_png(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise SpadeError(
            f"version {version} of {model_name} failed its check request: HTTP {exc.code}: "
            f"{exc.read().decode('utf-8', 'replace')[:300]}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise SpadeError(f"cannot reach the inference API at {inference_url} ({exc}); check --inference-url") from None
    if not body.startswith(b"\x89PNG"):
        raise SpadeError(f"version {version} of {model_name} answered its check request with no image")


def _loaded_from(torchserve: TorchServe, name: str, version: str) -> str:
    described = torchserve.describe(name, version)
    return str(described[0].get("modelUrl") or "") if described else ""


def _same_archive(model_url: str, expected_url: str, sha256: str, model_store: Path | None) -> bool:
    """Whether the server's copy of a version (loaded from `model_url`) is this archive."""
    if model_url == expected_url:
        return True
    if model_store is not None and model_url and "/" not in model_url and (model_store / model_url).is_file():
        return file_digest(model_store / model_url) == sha256
    return False


def deploy_to_torchserve(
    archive: Path,
    torchserve: TorchServe,
    *,
    model_name: str | None = None,
    model_store: Path | None = None,
    archive_url: str | None = None,
    workers: int = 1,
    ready_timeout: float = 300.0,
    drain: float = 5.0,
    inference_url: str | None = None,
    inference_token: str | None = None,
    keep_previous: bool = False,
    source: str | None = None,
    say: Callable[[str], None] = _say,
) -> dict:
    """Make `archive` the default version of its model in `torchserve` (the steps of the module doc).

    `source`: where the archive came from (a URI, the registry), for the messages and the result."""
    from spade.serve.register import archive_file_name, read_archive

    info = read_archive(archive)
    name = model_name or info.model_name
    version = info.version
    started = time.monotonic()
    if archive_url is None and model_store is None:
        raise SpadeError(
            "TorchServe must be able to load the archive: pass --model-store (its model store folder, for a "
            "server on this machine) or --archive-url (a URL the server may fetch)"
        )
    expected_url = archive_url or archive_file_name(name, version, info.sha256)
    result = {
        "model_name": name,
        "version": version,
        "torchserve": torchserve.url,
        "archive": source or str(archive),
        "archive_sha256": info.sha256,
        "archive_url": expected_url,
        "previous": torchserve.default_version(name),
        "registered": False,
        "default": False,
        "unregistered": [],
    }
    known = version in torchserve.versions(name)
    if known:
        loaded_from = _loaded_from(torchserve, name, version)
        if not _same_archive(loaded_from, expected_url, info.sha256, model_store):
            raise SpadeError(
                f"TorchServe at {torchserve.url} already has version {version} of {name}, loaded from "
                f"{loaded_from or 'elsewhere'}, not from this archive ({expected_url}); give each archive its own "
                "version (spade package --version)"
            )
    if result["previous"] == version:
        torchserve.wait_ready(name, version, ready_timeout)
        say(f"deploy: version {version} of {name} is already the default at {torchserve.url}; nothing to do")
        result.update(default=True, already_live=True, seconds=round(time.monotonic() - started, 2))
        return result

    placed, wrote = None, False
    if archive_url is None and not known:
        placed, wrote = _place(archive, model_store, expected_url)

    registered_now = False
    try:
        if known:
            say(f"deploy: version {version} of {name} is registered already (not the default); checking it")
        else:
            say(f"deploy: registering {expected_url} as version {version} of {name} ({workers} worker(s))")
            # asynchronously: a synchronous registration holds one of the server's network threads until the
            # workers are up, and the requests that land on that thread would wait with it
            registered_now = torchserve.register(expected_url, name, workers=workers, synchronous=False)
            if not registered_now:
                raise SpadeError(
                    f"TorchServe already has a version {version} of {name} from another archive; give each archive "
                    "its own version (spade package --version)"
                )
        result["registered"] = True
        torchserve.wait_ready(name, version, ready_timeout)
        if inference_url:
            probe(inference_url, name, version, inference_token, ready_timeout)
            say(f"deploy: version {version} answered its check request")
        torchserve.set_default(name, version)
    except BaseException as exc:
        left = None
        if registered_now:  # leave the server as it was: the old default keeps serving, alone
            try:
                torchserve.unregister(name, version)
            except SpadeError as cleanup:
                left = cleanup
                say(f"deploy: could not unregister the failed version {version} again: {cleanup}")
        if wrote and placed is not None and left is None:
            placed.unlink(missing_ok=True)
        if isinstance(exc, SpadeError):
            if result["previous"]:
                kept = f"version {result['previous']} stays the default"
            elif left is not None:  # a new model's first version is its default at once, and it stayed
                kept = f"and version {version}, which could not be removed again, is still registered as the default"
            else:
                kept = "nothing was deployed"
            raise SpadeError(f"deploy of {result['archive']} failed, {kept}: {exc}") from None
        raise
    result["default"] = True
    say(f"deploy: version {version} of {name} is the default now (was {result['previous'] or 'none'})")

    previous = result["previous"]
    if previous and not keep_previous:
        try:
            _drain(torchserve, name, previous, drain)
            torchserve.unregister(name, previous, synchronous=False)
            result["unregistered"].append(previous)
            say(f"deploy: unregistered version {previous}")
        except SpadeError as exc:  # the new version serves; the old one is only left over
            result["unregister_error"] = str(exc)
            say(f"deploy: warning: version {version} serves, but version {previous} could not be retired: {exc}")
    result["seconds"] = round(time.monotonic() - started, 2)
    result["time"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return result


def _drain(torchserve: TorchServe, name: str, version: str, seconds: float) -> None:
    """Give requests already sent to the old version time to finish before it goes: `seconds` during which
    its queue stayed empty (where the server reports its queue; else `seconds` plainly), so that the batch a
    worker took last is answered too. At most `seconds` + 5 minutes in all."""
    start = time.monotonic()
    quiet_since = start
    while time.monotonic() - start < seconds + 300.0:
        pending = torchserve.pending_requests(name, version)
        now = time.monotonic()
        if pending:
            quiet_since = now
            time.sleep(0.25)
        elif now - quiet_since >= seconds:
            return
        else:
            time.sleep(min(0.25, seconds - (now - quiet_since)))


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--mar", help="the archive (.mar): a path or s3:// URI")
    what.add_argument("--model", help="a registered model of the MLflow Model Registry (with --alias)")
    parser.add_argument("--alias", default="champion", help="alias or version number of --model (default champion)")
    parser.add_argument("--tracking-uri", help="MLflow tracking server for --model (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--torchserve-url", required=True, help="TorchServe management API, e.g. http://127.0.0.1:8081")
    parser.add_argument("--torchserve-token", help=f"management key (default: ${TOKEN_ENV})")
    parser.add_argument("--model-store", type=Path, help="the server's model store folder (the archive is copied in)")
    parser.add_argument("--archive-url", help="a URL the server fetches the archive from (instead of --model-store)")
    parser.add_argument("--model-name", help="the model's name in TorchServe (default: the archive's)")
    parser.add_argument("--workers", type=int, default=1, help="workers of the new version (default 1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for its workers (default 300)")
    parser.add_argument(
        "--drain", type=float, default=5.0, help="seconds the old version keeps serving after the switch (default 5)"
    )
    parser.add_argument("--inference-url", help="inference API (e.g. http://127.0.0.1:8080): one check request first")
    parser.add_argument("--inference-token", help=f"inference key (default: ${INFERENCE_TOKEN_ENV})")
    parser.add_argument("--keep-previous", action="store_true", help="leave the previous version registered")


def main(args: argparse.Namespace) -> int:
    if args.workers < 1 or args.timeout <= 0 or args.drain < 0:
        raise SpadeError("--workers must be at least 1, --timeout positive and --drain not negative")
    registered = None
    with tempfile.TemporaryDirectory(prefix="spade-deploy-") as tmp:
        if args.model:
            uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                raise SpadeError("--model needs the MLflow server: --tracking-uri or $MLFLOW_TRACKING_URI")
            registered = resolve_registered_archive(args.model, args.alias, uri)
            archive = local_file(registered["uri"], Path(tmp), "archive")
            if not registered["sha256"]:
                _say(f"deploy: warning: version {registered['version']} records no archive_sha256: not checked")
            elif file_digest(archive) != registered["sha256"]:
                raise SpadeError(
                    f"{registered['uri']} does not have the sha256 recorded on version {registered['version']} of "
                    f"{args.model}: the stored archive changed since it was registered"
                )
            _say(f"deploy: {args.model} {args.alias} is version {registered['version']}: {registered['uri']}")
        else:
            archive = local_file(args.mar, Path(tmp), "archive")
        torchserve = TorchServe(args.torchserve_url, args.torchserve_token or os.environ.get(TOKEN_ENV) or None)
        result = deploy_to_torchserve(
            archive,
            torchserve,
            model_name=args.model_name,
            model_store=args.model_store,
            archive_url=args.archive_url,
            workers=args.workers,
            ready_timeout=args.timeout,
            drain=args.drain,
            inference_url=args.inference_url,
            inference_token=args.inference_token or os.environ.get(INFERENCE_TOKEN_ENV) or None,
            keep_previous=args.keep_previous,
            source=registered["uri"] if registered else args.mar,
        )
    if registered is not None:
        result["registry"] = registered
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0
