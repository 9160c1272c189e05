"""TorchServe's management API, over urllib: what registration and deployment call.

Facts of the API this relies on (TorchServe 0.8 and later): registering a second version of a model does
not change its default version; `PUT /models/NAME/VERSION/set-default` does; the default version cannot be
unregistered while another version exists; `GET /models/NAME/all` describes every version, `GET
/models/NAME` the default one. Registration and unregistration need the model API enabled
(`enable_model_api=true`); every call needs the management key when token authorization is on.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

from spade.errors import SpadeError

TOKEN_ENV = "TORCHSERVE_MANAGEMENT_TOKEN"


class TorchServe:
    """A TorchServe management API at `url` (e.g. http://127.0.0.1:8081), with its key when it has one."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str) -> tuple[int, str]:
        request = urllib.request.Request(f"{self.url}{path}", method=method, data=b"" if method != "GET" else None)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            body = exc.read().decode("utf-8", "replace")
            return exc.code, _server_message(body)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SpadeError(
                f"cannot reach the TorchServe management API at {self.url} ({reason}); check --torchserve-url "
                "(the management port, 8081 by default)"
            ) from None

    def _fail(self, what: str, status: int, message: str) -> SpadeError:
        hint = ""
        if status in (401, 403) or "token" in message.lower():
            hint = f"; pass the management key with --torchserve-token or ${TOKEN_ENV}"
        elif status == 405 or "model api" in message.lower():
            hint = "; this TorchServe has its model API off: start it with enable_model_api=true"
        return SpadeError(f"TorchServe at {self.url} refused to {what}: HTTP {status}: {message}{hint}")

    @staticmethod
    def _path(model_name: str, version: str | None = None) -> str:
        path = f"/models/{urllib.parse.quote(model_name, safe='')}"
        return path + (f"/{urllib.parse.quote(version, safe='')}" if version else "")

    def register(self, archive_url: str, model_name: str, *, workers: int = 1, synchronous: bool = True) -> bool:
        """Register; False when this version was already registered.

        synchronous: the call returns once the workers are up. A synchronous call holds one of the server's
        network threads for that long, and requests that land on that thread wait with it: under load, pass
        False and wait with `wait_ready`.
        """
        query = urllib.parse.urlencode(
            {
                "url": archive_url,
                "model_name": model_name,
                "initial_workers": workers,
                "synchronous": "true" if synchronous else "false",
            }
        )
        status, message = self._call("POST", f"/models?{query}")
        if 200 <= status < 300:
            return True
        if status == 409:  # "Model version X is already registered for model NAME"
            return False
        raise self._fail(f"register {archive_url} as {model_name}", status, message)

    def set_default(self, model_name: str, version: str) -> None:
        status, message = self._call("PUT", f"{self._path(model_name, version)}/set-default")
        if not 200 <= status < 300:
            raise self._fail(f"make version {version} of {model_name} the default", status, message)

    def unregister(self, model_name: str, version: str, *, synchronous: bool = True) -> None:
        query = "" if synchronous else "?synchronous=false"
        status, message = self._call("DELETE", self._path(model_name, version) + query)
        if not 200 <= status < 300:
            raise self._fail(f"unregister version {version} of {model_name}", status, message)

    def describe(self, model_name: str, version: str | None = None) -> list[dict]:
        """The description of one version (`version`; None: the default one; "all": every version); [] when
        TorchServe has no such model or version."""
        status, body = self._call("GET", self._path(model_name, version))
        if status == 404:
            return []
        if not 200 <= status < 300:
            raise self._fail(f"describe {model_name}", status, body)
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            raise SpadeError(f"TorchServe at {self.url} answered {body[:200]!r} to a describe call") from None
        return data if isinstance(data, list) else [data]

    def default_version(self, model_name: str) -> str | None:
        described = self.describe(model_name)
        return str(described[0].get("modelVersion")) if described else None

    def versions(self, model_name: str) -> list[str]:
        return [str(d.get("modelVersion")) for d in self.describe(model_name, "all")]

    def workers(self, model_name: str, version: str) -> list[dict]:
        described = self.describe(model_name, version)
        return [w for d in described for w in d.get("workers", [])]

    def wait_ready(self, model_name: str, version: str, timeout: float, *, restarts: int = 3) -> list[dict]:
        """Wait until every worker of the version is READY (at least one). SpadeError after `timeout` s, or
        as soon as its workers were started `restarts` times more than there are of them (a model that
        cannot load: TorchServe would keep restarting its workers)."""
        deadline = time.monotonic() + timeout
        workers: list[dict] = []
        started: set[str] = set()
        while True:
            workers = self.workers(model_name, version)
            if workers and all(w.get("status") == "READY" for w in workers):
                return workers
            started |= {f"{w.get('id')}@{w.get('pid')}" for w in workers if w.get("pid")}  # a restart: a new pid
            if len(started) > len(workers) + restarts:
                raise SpadeError(
                    f"the workers of version {version} of {model_name} keep failing to start ({len(started)} starts; "
                    "its handler or model cannot load: see the TorchServe log, model_log.log)"
                )
            if time.monotonic() >= deadline:
                states = ", ".join(str(w.get("status")) for w in workers) or "no workers"
                raise SpadeError(
                    f"version {version} of {model_name} did not become ready within {timeout:.0f} s ({states})"
                )
            time.sleep(0.5)

    def pending_requests(self, model_name: str, version: str) -> int | None:
        """Requests queued on the version (jobQueueStatus, where this TorchServe reports it), else None."""
        described = self.describe(model_name, version)
        queue = described[0].get("jobQueueStatus") if described else None
        if isinstance(queue, dict) and isinstance(queue.get("pendingRequests"), int):
            return queue["pendingRequests"]
        return None


def _server_message(body: str) -> str:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:500] or "(no message)"
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return body.strip()[:500]
