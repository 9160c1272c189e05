"""A photo collection from Flickr: `flickr.photos.search`, downloads with an attribution manifest.

The paper's landscapes set was 41k Flickr photos labelled by a segmenter; this module gathers
such a collection for `spade pseudolabel`. Output (the `photos` layout)::

    OUT/images/<photo id>.jpg    the photos, in the requested size
    OUT/manifest.jsonl           one line per photo: id, owner, owner name, licence (id, name, URL),
                                 title, page URL https://www.flickr.com/photos/<owner>/<id>, file, sha256
    OUT/flickr.json              the query of the last run (without the API key)

The API key comes from the `FLICKR_API_KEY` environment variable (a Kubernetes Secret mounted as
env in the cluster) or the `api_key` argument. Requests (API calls and image downloads) are
rate-limited; HTTP 429 / 503 (and other 5xx, connection errors) are retried with exponential
backoff, honouring Retry-After, a bounded number of times. A run is resumable: photos already in
the manifest are skipped, and a photo is written to the manifest only once its file is in place.
Photos are de-duplicated by id and by content (sha256): a repeated picture gets a `duplicate` line
and no file. A photo in a format the training stage does not read (spade.data.suffixes: e.g. a GIF
original) is not downloaded, only counted. Flickr returns at most 4,000 distinct results per query;
narrow or vary the query for more.

Flickr licence ids (flickr.photos.licenses.getInfo); the default keeps Creative Commons and public
domain ones, 1,2,3,4,5,6,9,10 (add 11-16 for the CC 4.0 licences)::

    0 All Rights Reserved            7  No known copyright restrictions
    1 CC BY-NC-SA 2.0                8  United States Government Work
    2 CC BY-NC 2.0                   9  CC0 1.0 (Public Domain Dedication)
    3 CC BY-NC-ND 2.0                10 Public Domain Mark 1.0
    4 CC BY 2.0                      11-16 CC BY, BY-SA, BY-ND, BY-NC, BY-NC-SA, BY-NC-ND 4.0
    5 CC BY-SA 2.0
    6 CC BY-ND 2.0
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from spade.data.http import USER_AGENT, retry_delay, retryable
from spade.data.suffixes import IMAGE_SUFFIXES
from spade.errors import SpadeError

ENDPOINT = "https://api.flickr.com/services/rest/"
API_KEY_ENV = "FLICKR_API_KEY"
DEFAULT_LICENSES = "1,2,3,4,5,6,9,10"
MANIFEST_NAME = "manifest.jsonl"
IMAGES_DIR = "images"
QUERY_NAME = "flickr.json"
SIZES = ("sq", "t", "s", "q", "m", "n", "z", "c", "l", "b", "h", "k", "3k", "4k", "5k", "6k", "o")
SORTS = (
    "relevance",
    "date-posted-desc",
    "date-posted-asc",
    "date-taken-desc",
    "date-taken-asc",
    "interestingness-desc",
    "interestingness-asc",
)
MAX_PER_PAGE = 500

LICENSES: dict[str, tuple[str, str]] = {
    "0": ("All Rights Reserved", ""),
    "1": ("CC BY-NC-SA 2.0", "https://creativecommons.org/licenses/by-nc-sa/2.0/"),
    "2": ("CC BY-NC 2.0", "https://creativecommons.org/licenses/by-nc/2.0/"),
    "3": ("CC BY-NC-ND 2.0", "https://creativecommons.org/licenses/by-nc-nd/2.0/"),
    "4": ("CC BY 2.0", "https://creativecommons.org/licenses/by/2.0/"),
    "5": ("CC BY-SA 2.0", "https://creativecommons.org/licenses/by-sa/2.0/"),
    "6": ("CC BY-ND 2.0", "https://creativecommons.org/licenses/by-nd/2.0/"),
    "7": ("No known copyright restrictions", "https://www.flickr.com/commons/usage/"),
    "8": ("United States Government Work", "http://www.usa.gov/copyright.shtml"),
    "9": ("CC0 1.0", "https://creativecommons.org/publicdomain/zero/1.0/"),
    "10": ("Public Domain Mark 1.0", "https://creativecommons.org/publicdomain/mark/1.0/"),
    "11": ("CC BY 4.0", "https://creativecommons.org/licenses/by/4.0/"),
    "12": ("CC BY-SA 4.0", "https://creativecommons.org/licenses/by-sa/4.0/"),
    "13": ("CC BY-ND 4.0", "https://creativecommons.org/licenses/by-nd/4.0/"),
    "14": ("CC BY-NC 4.0", "https://creativecommons.org/licenses/by-nc/4.0/"),
    "15": ("CC BY-NC-SA 4.0", "https://creativecommons.org/licenses/by-nc-sa/4.0/"),
    "16": ("CC BY-NC-ND 4.0", "https://creativecommons.org/licenses/by-nc-nd/4.0/"),
}

# time.sleep, replaceable by tests that check the waits without waiting
_sleep: Callable[[float], None] = time.sleep


@dataclass
class FlickrQuery:
    """What to search for and how much of it to download (see the module doc for licence ids)."""

    text: str = ""
    tags: str = ""  # comma-separated
    tag_mode: str = "all"  # all: every tag, any: one of them
    license: str = DEFAULT_LICENSES  # comma-separated licence ids
    count: int = 100  # photos to keep (duplicates do not count)
    size: str = "z"  # url_<size>: z = 640 px on the long side, b = 1024, c = 800, o = original
    sort: str = "relevance"
    per_page: int = 100
    min_upload_date: str = ""
    bbox: str = ""  # "min_lon,min_lat,max_lon,max_lat"

    def __post_init__(self) -> None:
        self.count, self.per_page = int(self.count), int(self.per_page)
        self.license = ",".join(x.strip() for x in str(self.license).split(",") if x.strip())
        if not (self.text or self.tags):
            raise SpadeError("a Flickr query needs text or tags, e.g. flickr:?text=mountain+lake&tags=landscape")
        if self.count < 1:
            raise SpadeError(f"Flickr count must be at least 1 (got {self.count})")
        if not 1 <= self.per_page <= MAX_PER_PAGE:
            raise SpadeError(f"Flickr per_page must be within 1..{MAX_PER_PAGE} (got {self.per_page})")
        if self.size not in SIZES:
            raise SpadeError(f"unknown Flickr size {self.size!r}; one of {', '.join(SIZES)}")
        if self.sort not in SORTS:
            raise SpadeError(f"unknown Flickr sort {self.sort!r}; one of {', '.join(SORTS)}")
        if self.tag_mode not in ("all", "any"):
            raise SpadeError(f"Flickr tag_mode is all or any (got {self.tag_mode!r})")
        unknown = [x for x in self.license.split(",") if x and x not in LICENSES]
        if unknown:
            raise SpadeError(f"unknown Flickr licence id(s) {', '.join(unknown)}; known: 0-16 (see spade.data.flickr)")

    @classmethod
    def from_source(cls, source: str, **overrides: object) -> FlickrQuery:
        """Parse `flickr:?text=mountain+lake&tags=landscape&count=200&size=z`; `overrides` (not None) win."""
        if not source.startswith("flickr:"):
            raise SpadeError(f"{source}: a Flickr source starts with flickr:?, like flickr:?text=lake&count=50")
        query = source[len("flickr:") :].lstrip("/").lstrip("?")
        known = {f.name for f in fields(cls)}
        values: dict[str, object] = {}
        for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            key = key.replace("-", "_")
            if key not in known:
                raise SpadeError(f"{source}: unknown Flickr query parameter {key!r}; known: {', '.join(sorted(known))}")
            values[key] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)  # type: ignore[arg-type]
        except ValueError as exc:
            raise SpadeError(f"{source}: {exc}") from None

    def search_params(self) -> dict[str, str]:
        params = {
            "method": "flickr.photos.search",
            "text": self.text,
            "tags": self.tags,
            "tag_mode": self.tag_mode,
            "license": self.license,
            "extras": f"license,owner_name,url_{self.size},o_dims",
            "per_page": str(self.per_page),
            "sort": self.sort,
            "content_type": "1",
            "media": "photos",
            "format": "json",
            "nojsoncallback": "1",
            "min_upload_date": self.min_upload_date,
            "bbox": self.bbox,
        }
        return {k: v for k, v in params.items() if v}


@dataclass
class FlickrReport:
    out: Path
    downloaded: int = 0  # new photos of this run
    already: int = 0  # photos found in the manifest from an earlier run
    duplicates: int = 0  # same content as a photo kept before
    unavailable: int = 0  # no URL in the requested size, or Flickr's "photo unavailable" picture
    unsupported: int = 0  # a format nothing here reads (IMAGE_SUFFIXES), e.g. GIF: not downloaded
    pages: int = 0
    failed: list[str] = field(default_factory=list)

    @property
    def images(self) -> Path:
        return self.out / IMAGES_DIR

    @property
    def manifest(self) -> Path:
        return self.out / MANIFEST_NAME

    @property
    def kept(self) -> int:
        return self.downloaded + self.already

    def summary(self) -> str:
        return (
            f"flickr: {self.kept} photo(s) in {self.images} ({self.downloaded} new, {self.already} from before, "
            f"{self.duplicates} duplicate(s), {self.unavailable} unavailable, {self.unsupported} in an unread "
            f"format, {len(self.failed)} failed)"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


class RateLimiter:
    """At most `rate` calls of wait() per second (evenly spaced); rate <= 0 means no limit."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            delay = self.next - now
            self.next = max(now, self.next) + self.interval
        if delay > 0:
            _sleep(delay)


class _Client:
    """HTTP GETs with the rate limit and the retries."""

    def __init__(self, rate: float, retries: int, timeout: float, backoff: float) -> None:
        self.limiter = RateLimiter(rate)
        self.retries, self.timeout, self.backoff = retries, timeout, backoff

    def get(self, url: str, what: str) -> tuple[bytes, str]:
        """The body and the final URL (after redirects) of `url`."""
        for attempt in range(self.retries + 1):
            self.limiter.wait()
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read(), response.geturl()
            except OSError as exc:  # HTTPError and URLError included
                if not retryable(exc) or attempt == self.retries:
                    if isinstance(exc, urllib.error.HTTPError):
                        hint = " (throttled: lower --rate)" if exc.code == 429 else ""
                        raise SpadeError(f"{what}: HTTP {exc.code} {exc.reason} from {_redact(url)}{hint}") from None
                    raise SpadeError(f"{what}: cannot reach {_redact(url)}: {exc}") from None
                _sleep(retry_delay(exc, attempt, backoff=self.backoff))
        raise AssertionError("unreachable")  # pragma: no cover


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = [(k, "***" if k == "api_key" else v) for k, v in urllib.parse.parse_qsl(parts.query)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def license_info(license_id: object) -> dict:
    key = str(license_id)
    name, url = LICENSES.get(key, (f"unknown licence {key}", ""))
    return {"license": key, "license_name": name, "license_url": url}


def read_manifest(path: Path) -> list[dict]:
    """The records of a manifest; a torn last line (a crash mid-write) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def is_flickr_folder(out: str | Path) -> bool:
    """Whether `out` holds an earlier (maybe interrupted) run of fetch_flickr: its manifest and query files."""
    out = Path(out)
    return (out / MANIFEST_NAME).is_file() and (out / QUERY_NAME).is_file()


def fetch_flickr(
    query: FlickrQuery,
    out: str | Path,
    *,
    api_key: str | None = None,
    endpoint: str = ENDPOINT,
    rate: float = 1.0,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 30.0,
    progress: bool = True,
    on_photo: Callable[[dict], None] | None = None,
) -> FlickrReport:
    """Search Flickr and download up to `query.count` photos into `out/images` (see the module doc).

    `rate` is the most requests per second (API calls and downloads together); `retries` bounds the
    retries of one request. `on_photo` is called with each new manifest record once it is written.
    """
    from spade.progress import progress_bar

    api_key = api_key or os.environ.get(API_KEY_ENV, "")
    if not api_key:
        raise SpadeError(
            f"a Flickr API key is needed: set {API_KEY_ENV} (https://www.flickr.com/services/apps/create/) "
            "or pass api_key"
        )
    out = Path(out)
    images = out / IMAGES_DIR
    images.mkdir(parents=True, exist_ok=True)
    for stale in images.glob(".*.part"):
        stale.unlink(missing_ok=True)
    manifest_path = out / MANIFEST_NAME
    report = FlickrReport(out=out)
    seen_ids: set[str] = set()
    hashes: dict[str, str] = {}  # sha256 -> photo id
    for rec in read_manifest(manifest_path):
        if rec.get("status", "ok") == "ok" and not (out / rec.get("file", "")).is_file():
            continue  # its file is gone: fetch it again
        seen_ids.add(str(rec["id"]))
        if rec.get("status", "ok") == "ok":
            hashes.setdefault(rec["sha256"], str(rec["id"]))
            report.already += 1
    (out / QUERY_NAME).write_text(json.dumps({"endpoint": endpoint, **asdict(query)}, indent=2) + "\n")
    client = _Client(rate, retries, timeout, backoff)
    if report.kept >= query.count:
        return report

    if manifest_path.is_file() and not manifest_path.read_bytes().endswith(b"\n") and manifest_path.stat().st_size:
        with manifest_path.open("a") as fh:
            fh.write("\n")  # end a torn last line so that the next record starts on its own
    params = {**query.search_params(), "api_key": api_key}
    page, pages = 1, 1
    with (
        manifest_path.open("a") as manifest,
        progress_bar(total=query.count, initial=report.kept, desc="flickr", unit="photo", disable=not progress) as bar,
    ):
        while page <= pages and report.kept < query.count:
            url = f"{endpoint}?{urllib.parse.urlencode({**params, 'page': str(page)})}"
            result = _search_page(client, url, endpoint)
            report.pages += 1
            photos = result.get("photo") or []
            pages = int(result.get("pages") or 0)
            if not photos:
                break
            for photo in photos:
                if report.kept >= query.count:
                    break
                pid = str(photo.get("id", ""))
                if not pid or pid in seen_ids:
                    continue
                seen_ids.add(pid)
                record = _download_photo(client, photo, query.size, images, hashes, report)
                if record is None:
                    continue
                manifest.write(json.dumps(record) + "\n")
                manifest.flush()
                os.fsync(manifest.fileno())
                if record["status"] == "ok":
                    bar.update(1)
                if on_photo is not None:
                    on_photo(record)
            page += 1
    return report


def _search_page(client: _Client, url: str, endpoint: str) -> dict:
    body, _ = client.get(url, "flickr.photos.search")
    try:
        data = json.loads(body)
    except ValueError:
        raise SpadeError(f"flickr.photos.search at {endpoint}: the answer is not JSON: {body[:200]!r}") from None
    if data.get("stat") != "ok":
        code, message = data.get("code", "?"), data.get("message", "no message")
        hint = f"; check {API_KEY_ENV}" if str(code) in ("100", "105") else ""
        raise SpadeError(f"Flickr API error {code}: {message} (flickr.photos.search at {endpoint}){hint}")
    return data.get("photos") or {}


def _download_photo(
    client: _Client, photo: dict, size: str, images: Path, hashes: dict[str, str], report: FlickrReport
) -> dict | None:
    pid, owner = str(photo["id"]), str(photo.get("owner", ""))
    url = photo.get(f"url_{size}")
    if not url:
        report.unavailable += 1
        return None
    suffix = Path(urllib.parse.urlsplit(url).path).suffix.lower() or ".jpg"
    if suffix not in IMAGE_SUFFIXES:
        report.unsupported += 1
        return None
    try:
        body, final_url = client.get(url, f"photo {pid}")
    except SpadeError as exc:
        report.failed.append(str(exc))
        return None
    if "photo_unavailable" in final_url or not body:
        report.unavailable += 1
        return None
    digest = hashlib.sha256(body).hexdigest()
    record = {
        "id": pid,
        "owner": owner,
        "owner_name": photo.get("ownername", ""),
        **license_info(photo.get("license", "")),
        "title": photo.get("title", ""),
        "page_url": f"https://www.flickr.com/photos/{owner}/{pid}",
        "url": url,
        "width": _int(photo.get(f"width_{size}")),
        "height": _int(photo.get(f"height_{size}")),
        "sha256": digest,
    }
    if digest in hashes:
        report.duplicates += 1
        return {**record, "status": "duplicate", "duplicate_of": hashes[digest], "file": None}
    target = images / f"{pid}{suffix}"
    part = images / f".{pid}{suffix}.part"
    part.write_bytes(body)
    os.replace(part, target)
    hashes[digest] = pid
    report.downloaded += 1
    return {**record, "status": "ok", "file": f"{IMAGES_DIR}/{target.name}"}


def _int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
