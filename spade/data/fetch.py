"""Fetching a dataset: the pipeline's first stage.

A source is one of

- a local folder (copied) or archive file (extracted),
- an `http(s)://` URL of an archive: downloaded to a `.part` file that an interrupted download resumes
  (HTTP Range; a server without Range support restarts it cleanly),
- an `s3://bucket/key` archive or `s3://bucket/prefix/` folder (an S3-compatible store through
  AWS_ENDPOINT_URL, like spade.storage),
- `flickr:?text=...&tags=...&count=N&size=z`: a photo collection from Flickr (spade.data.flickr; the
  API key from FLICKR_API_KEY, and FLICKR_ENDPOINT / FLICKR_RATE override the endpoint and requests per
  second). It is resumed rather than replaced: `force` does not apply, nor does `sha256`. OUT must be new,
  empty, or an earlier fetch (flickr: or not): a folder of other files is refused.

Archives (zip, tar, tar.gz / tgz, tar.bz2, tar.xz; told apart by content) are extracted safely: every
entry is checked before anything is written, and one that would land outside the target (`..`, absolute
paths, links pointing out of it, directly or through a chain of the archive's own links), passes through a
link, or is a device file is refused with an error naming it. What an archive may expand to is bounded
(ExtractLimits: total bytes, entries, bytes per byte of the archive), from its headers first and from the
bytes written while they stream, so a bomb stops early. Extraction goes to a temporary folder beside OUT
that is renamed to OUT once complete and removed on any failure, so OUT is never a half-extracted dataset.
An archive holding one top folder is entered.

OUT is the dataset root afterwards, with `fetch.json` (the FetchResult) and a `.spade-fetch` marker
(source + sha256): fetching the same source into it again does nothing unless `force`. Layouts:
coco, ade20k, cityscapes, custom (classes.txt) and photos (unlabelled images for `spade pseudolabel`).
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import shutil
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from spade.data.http import USER_AGENT, retry_delay, retryable
from spade.data.suffixes import IMAGE_SUFFIXES
from spade.errors import SpadeError

LAYOUTS = ("coco", "ade20k", "cityscapes", "custom", "photos")
RESULT_NAME = "fetch.json"
MARKER_NAME = ".spade-fetch"
SPLITS = ("train", "val")
IGNORED_TOP = {"__MACOSX"}
DOWNLOAD_ATTEMPTS = 5
CHUNK = 1 << 16
FLICKR_OPTIONS = (
    "flickr_text",
    "flickr_tags",
    "flickr_license",
    "flickr_sort",
    "count",
    "size",
    "rate",
    "flickr_endpoint",
)

EXAMPLES = """examples:
  spade fetch https://example.org/ade20k.zip --out data/ade20k --sha256 0123abc...
  spade fetch s3://datasets/coco_stuff.tar.gz --out data/coco --layout coco
  spade fetch s3://datasets/landscapes/ --out data/landscapes      # a folder of an S3 bucket
  spade fetch ./downloads/cityscapes.tar --out data/cityscapes
  spade fetch ./my_photos --out data/photos                         # a local folder, copied
  spade fetch big.tar.gz --out data/big --max-bytes 300G --max-entries 5000000   # larger limits
  FLICKR_API_KEY=... spade fetch "flickr:?text=mountain+lake&tags=landscape&count=200&size=z" --out data/flickr
  FLICKR_API_KEY=... spade fetch flickr: --flickr-text "mountain lake" --flickr-license 4,5,9,10 \\
      --count 500 --size b --rate 0.5 --out data/flickr
  spade pseudolabel --images data/flickr/images --segmenter ... --out data/landscapes   # label the photos

Flickr licence ids (default 1,2,3,4,5,6,9,10: Creative Commons 2.0, CC0 and Public Domain Mark):
  0 all rights reserved, 1 BY-NC-SA 2.0, 2 BY-NC 2.0, 3 BY-NC-ND 2.0, 4 BY 2.0, 5 BY-SA 2.0, 6 BY-ND 2.0,
  7 no known copyright restrictions, 8 US Government work, 9 CC0 1.0, 10 Public Domain Mark 1.0,
  11-16 CC 4.0 (BY, BY-SA, BY-ND, BY-NC, BY-NC-SA, BY-NC-ND)
"""


@dataclass
class FetchResult:
    path: Path  # the dataset root
    layout: str
    fingerprint: str  # spade.data.fingerprint.files_fingerprint of its files (fetch.json and marker left out)
    files: int
    source: str
    needs_labels: bool  # True for photos: run `spade pseudolabel` on them

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def fetch_dataset(
    source: str,
    out: str | Path,
    *,
    sha256: str | None = None,
    layout: str = "auto",
    force: bool = False,
    progress: bool = True,
    flickr_text: str | None = None,
    flickr_tags: str | None = None,
    flickr_license: str | None = None,
    flickr_sort: str | None = None,
    count: int | None = None,
    size: str | None = None,
    rate: float | None = None,
    flickr_endpoint: str | None = None,
    limits: ExtractLimits | None = None,
) -> FetchResult:
    """Fetch `source` (see the module doc) into the folder `out`; returns what is there.

    `limits` bounds what an archive may unpack to (default: ExtractLimits()); past one, nothing is kept.

    The flickr_* options, count, size, rate and flickr_endpoint (FLICKR_OPTIONS) apply to flickr: sources
    only: they override the source's query (see `spade fetch --help`); None leaves it as it is.
    """
    out = Path(out)
    if layout != "auto" and layout not in LAYOUTS:
        raise SpadeError(f"unknown layout {layout!r}; one of auto, {', '.join(LAYOUTS)}")
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise SpadeError(f"--sha256 must be 64 hex digits (got {sha256!r})")
    flickr = {
        "flickr_text": flickr_text,
        "flickr_tags": flickr_tags,
        "flickr_license": flickr_license,
        "flickr_sort": flickr_sort,
        "count": count,
        "size": size,
        "rate": rate,
        "flickr_endpoint": flickr_endpoint,
    }
    if source.startswith("flickr:"):
        return _fetch_flickr_source(source, out, flickr, sha256=sha256, layout=layout, progress=progress)
    given = [name for name, value in flickr.items() if value is not None]
    if given:
        raise SpadeError(f"{', '.join('--' + o.replace('_', '-') for o in given)} only apply to flickr: sources")

    done = _completed(out, source, sha256)
    if done is not None and not force:
        if progress:
            print(
                f"fetch: {out} already holds {source} ({done.layout}, {done.files} files); --force to fetch again",
                file=sys.stderr,
            )
        return done
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.fetch"
    tmp = work / "tree"
    if tmp.exists():
        shutil.rmtree(tmp)
    work.mkdir(exist_ok=True)
    ok = False
    try:
        if _is_remote(source):
            archive = _download(source, work, progress=progress)  # an s3:// prefix: the folder `tmp`, filled
            _check_sha256(archive, sha256, source, delete=True)
            _extract(archive, tmp, source, limits)
        else:
            local = Path(source).expanduser()
            if not (local.is_dir() or local.is_file()):
                raise SpadeError(f"source not found: {source} (a folder, archive, http(s)://, s3:// or flickr: URL)")
            _check_sha256(local, sha256, source, delete=False)
            if local.is_dir():
                _copy_tree(local, tmp)
            else:
                _extract(local, tmp, source, limits)
        root = _descend(tmp)
        found = detect_layout(root, layout, source)
        result = _describe(root, found, source)
        result.path = out  # where it lands: written to fetch.json
        _write_result(root, result, sha256)
        _replace(root, out)
        ok = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if ok or not any(work.glob("*.part")):
            shutil.rmtree(work, ignore_errors=True)
    if progress:
        print(
            f"fetch: {source} -> {out} ({result.layout}, {result.files} files, fingerprint {result.fingerprint})",
            file=sys.stderr,
        )
    return result


# --------------------------------------------------------------------------- flickr


def _fetch_flickr_source(
    source: str, out: Path, options: dict, *, sha256: str | None, layout: str, progress: bool
) -> FetchResult:
    """Flickr photos into `out`, `options` (FLICKR_OPTIONS) overriding the source's query; endpoint and rate
    default to FLICKR_ENDPOINT / FLICKR_RATE, else the API and 1 request per second."""
    from spade.data.flickr import ENDPOINT, FlickrQuery, fetch_flickr

    if sha256 is not None:
        raise SpadeError(f"{source}: --sha256 does not apply to flickr: sources (it checks an archive file)")
    if layout not in ("auto", "photos"):
        raise SpadeError(f"{source}: a flickr: source gives the photos layout, not {layout}")
    query = FlickrQuery.from_source(
        source,
        text=options["flickr_text"],
        tags=options["flickr_tags"],
        license=options["flickr_license"],
        sort=options["flickr_sort"],
        count=options["count"],
        size=options["size"],
    )
    _check_replaceable(out, flickr=True)
    endpoint = options["flickr_endpoint"] or os.environ.get("FLICKR_ENDPOINT") or ENDPOINT
    rate = options["rate"]
    if rate is None:
        try:
            rate = float(os.environ.get("FLICKR_RATE") or 1.0)
        except ValueError:
            value = os.environ["FLICKR_RATE"]
            raise SpadeError(f"FLICKR_RATE must be a number of requests per second, not {value!r}") from None
    report = fetch_flickr(query, out, progress=progress, endpoint=endpoint, rate=rate)
    if progress:
        print(report.summary(), file=sys.stderr)
    if report.kept == 0:
        raise SpadeError(f"{source}: Flickr found no photos to download; widen the query or the licences")
    result = _describe(out, "photos", source)
    _write_result(out, result, None)
    return result


# --------------------------------------------------------------------------- completion marker


def _completed(out: Path, source: str, sha256: str | None) -> FetchResult | None:
    """The earlier result when `out` is a complete fetch of the same source (and checksum)."""
    try:
        marker = json.loads((out / MARKER_NAME).read_text())
        data = json.loads((out / RESULT_NAME).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("source") != source or (sha256 is not None and marker.get("sha256") != sha256):
        return None
    data["path"] = out
    try:
        return FetchResult(**data)
    except TypeError:
        return None


def _check_replaceable(out: Path, *, flickr: bool = False) -> None:
    """Refuse an `out` that is not a folder, or a non-empty one that no fetch wrote: a later fetch replaces it,
    and the files in it would go. `flickr`: an earlier Flickr fetch (interrupted: no marker yet) is one."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise SpadeError(f"{out} exists and is not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()) or (out / MARKER_NAME).is_file():
        return
    signs = f"no {MARKER_NAME}"
    if flickr:
        from spade.data.flickr import MANIFEST_NAME, QUERY_NAME, is_flickr_folder

        if is_flickr_folder(out):
            return
        signs += f", nor the {MANIFEST_NAME} and {QUERY_NAME} of a Flickr fetch"
    raise SpadeError(
        f"{out} is not empty and was not written by spade fetch ({signs}); choose another --out or remove it"
    )


def _write_result(root: Path, result: FetchResult, sha256: str | None) -> None:
    (root / RESULT_NAME).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    marker = {"source": result.source, "sha256": sha256, "fingerprint": result.fingerprint, "time": time.time()}
    (root / MARKER_NAME).write_text(json.dumps(marker) + "\n")


def _replace(new: Path, out: Path) -> None:
    """Rename the finished tree to `out`; an older fetch there is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- layouts


def _files(root: Path) -> list[Path]:
    """Plain files under root, hidden ones and fetch.json left out."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.startswith(".") or (name == RESULT_NAME and Path(folder) == root):
                continue
            found.append(Path(folder) / name)
    return sorted(found)


def _has_images(folder: Path, recursive: bool = False) -> bool:
    if not folder.is_dir():
        return False
    pattern = "**/*" if recursive else "*"
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in folder.glob(pattern))


def _pairs_of(root: Path, label: str, image: str) -> bool:
    return any((root / f"{s}_{label}").is_dir() and (root / f"{s}_{image}").is_dir() for s in SPLITS)


def _matches(root: Path, layout: str) -> bool:
    if layout == "cityscapes":
        return (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir()
    if layout == "ade20k":
        return any(
            (root / "images" / s).is_dir() and (root / "annotations" / s).is_dir() for s in ("training", "validation")
        )
    if layout == "custom":
        return (root / "classes.txt").is_file() and _pairs_of(root, "label", "img")
    if layout == "coco":
        return _pairs_of(root, "label", "img")
    if layout == "photos":  # images, and no sign of label maps (a labels-only archive is not a photo collection)
        labelled = {"gtFine", "annotations", "labels", "label"} | {
            f"{s}_{k}" for s in SPLITS for k in ("label", "inst")
        }
        return _has_images(root, recursive=True) and not any((root / name).exists() for name in labelled)
    raise AssertionError(layout)


def detect_layout(root: str | Path, layout: str = "auto", source: str = "") -> str:
    """The layout of the dataset folder `root` (or a check that it is `layout`)."""
    root = Path(root)
    where = f"{source} ({root})" if source else str(root)
    if layout != "auto":
        if not _matches(root, layout):
            raise SpadeError(f"{where} is not in the {layout} layout: {_expectations()[layout]}")
        return layout
    for name in ("cityscapes", "ade20k", "custom", "coco", "photos"):
        if _matches(root, name):
            return name
    listing = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:12]) or "nothing"
    expected = "\n".join(f"  {k}: {v}" for k, v in _expectations().items())
    raise SpadeError(f"{where}: no known dataset layout (it holds {listing}). Expected one of:\n{expected}")


def _expectations() -> dict[str, str]:
    return {
        "coco": "train_label/ + train_img/ (or val_*), optional *_inst/",
        "ade20k": "images/training/ + annotations/training/ (or validation)",
        "cityscapes": "leftImg8bit/<split>/<city>/ + gtFine/<split>/<city>/",
        "custom": "classes.txt + train_label/ + train_img/ (or val_*)",
        "photos": "image files (.jpg, .png, ...) in the folder or its subfolders",
    }


def _describe(root: Path, layout: str, source: str) -> FetchResult:
    from spade.data.fingerprint import files_fingerprint

    files = _files(root)
    return FetchResult(
        path=root,
        layout=layout,
        fingerprint=files_fingerprint(files, root),
        files=len(files),
        source=source,
        needs_labels=layout == "photos",
    )


def _descend(tmp: Path) -> Path:
    """The folder to use as dataset root: the single top folder of an archive is entered."""
    root = tmp
    while True:
        entries = [p for p in root.iterdir() if p.name not in IGNORED_TOP and not p.name.startswith(".")]
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].is_symlink():
            return root
        root = entries[0]


def _copy_tree(src: Path, dst: Path) -> None:
    if dst.resolve().is_relative_to(src.resolve()):
        raise SpadeError(f"{src}: --out is inside the source folder; choose an --out outside it")
    shutil.copytree(src, dst, symlinks=False)


# --------------------------------------------------------------------------- downloads


def _is_remote(source: str) -> bool:
    return source.startswith(("http://", "https://", "s3://"))


def _download(source: str, work: Path, *, progress: bool) -> Path:
    name = PurePosixPath(urllib.parse.urlsplit(source).path).name or "download"
    target = work / name
    if source.startswith("s3://"):
        return _download_s3(source, work)
    part = work / f"{name}.part"
    for attempt in range(DOWNLOAD_ATTEMPTS):
        try:
            _http_get(source, part, progress=progress)
            os.replace(part, target)
            return target
        except (OSError, _ShortRead) as exc:  # HTTPError and URLError included
            if isinstance(exc, OSError) and not retryable(exc):
                part.unlink(missing_ok=True)
                reason = f"HTTP {exc.code} {exc.reason}" if isinstance(exc, urllib.error.HTTPError) else str(exc)
                raise SpadeError(f"cannot download {source}: {reason}") from None
            if attempt == DOWNLOAD_ATTEMPTS - 1:
                raise SpadeError(
                    f"cannot download {source} ({exc}); the partial file {part} is kept: run again to resume"
                ) from None
            wait = retry_delay(exc, attempt, backoff=0.2)
            print(f"fetch: download of {source} interrupted ({exc}); resuming in {wait:.1f} s", file=sys.stderr)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


class _ShortRead(Exception):
    pass


def _http_get(url: str, part: Path, *, progress: bool) -> None:
    """One attempt at the rest of `url` into `part` (Range from its size); returns once `part` is complete.

    `part.meta` holds the ETag / Last-Modified of the download `part` belongs to (the If-Range validator);
    a part without a readable one is not resumed but started again.
    """
    from spade.progress import progress_bar

    have = part.stat().st_size if part.exists() else 0
    meta_path = part.with_name(part.name + ".meta")
    meta = _read_meta(meta_path) if have else {}
    if meta is None:  # torn or missing: whose part this is cannot be checked
        part.unlink()
        have, meta = 0, {}
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = meta.get("etag") or meta.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # our .part is no prefix of it (changed or complete): start again
            part.unlink(missing_ok=True)
            raise _ShortRead("the server refused the resume range; starting again") from None
        raise
    with response:
        content_range = response.headers.get("Content-Range") or ""
        if have and response.status == 206 and content_range.startswith(f"bytes {have}-"):
            mode, start = "ab", have
            total = _content_range_total(content_range)
        else:  # 200: no Range support (or the file changed): from the start
            mode, start = "wb", 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            meta = {"etag": response.headers.get("ETag"), "last_modified": response.headers.get("Last-Modified")}
            _write_meta(meta_path, meta)
        done = start
        with (
            part.open(mode) as fh,
            progress_bar(
                total=total, initial=start, unit="B", unit_scale=True, desc=part.name[:-5], disable=not progress
            ) as bar,
        ):
            while True:
                try:
                    block = response.read(CHUNK)
                except (OSError, ValueError) as exc:  # http.client.IncompleteRead is a ValueError... and OSError
                    raise _ShortRead(f"connection lost after {done} bytes: {exc}") from None
                if not block:
                    break
                fh.write(block)
                done += len(block)
                bar.update(len(block))
    if total is not None and done < total:
        raise _ShortRead(f"got {done} of {total} bytes")
    meta_path.unlink(missing_ok=True)


def _read_meta(path: Path) -> dict | None:
    """The validators of a partial download; None when the file is missing or unreadable."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _write_meta(path: Path, meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, path)  # never a torn file


def _content_range_total(value: str | None) -> int | None:
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1]
    return int(total) if total.isdigit() else None


def _download_s3(source: str, work: Path) -> Path:
    """An s3:// object (an archive: the downloaded file) or prefix (a folder: work/tree is filled)."""
    from spade.storage import s3_client, split_s3

    bucket, key = split_s3(source)
    client = s3_client()
    if key and not source.endswith("/"):
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except Exception:  # noqa: BLE001 - not an object: maybe a prefix
            head = None
        if head is not None:
            target = work / PurePosixPath(key).name
            part = work / f"{target.name}.part"
            try:
                client.download_file(bucket, key, str(part))
            except Exception as exc:
                part.unlink(missing_ok=True)
                raise SpadeError(f"cannot download {source}: {exc}") from None
            os.replace(part, target)
            return target
    prefix = f"{key.rstrip('/')}/" if key else ""
    tree = work / "tree"
    count = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if not rel or rel.endswith("/"):
                    continue
                dest = _safe_target(tree, rel, source)
                dest.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, obj["Key"], str(dest))
                count += 1
    except SpadeError:
        raise
    except Exception as exc:
        raise SpadeError(f"cannot download {source}: {exc} (credentials: AWS_*; store: AWS_ENDPOINT_URL)") from None
    if not count:
        raise SpadeError(f"{source}: no such object and nothing under that prefix")
    return tree


def _check_sha256(path: Path, expected: str | None, source: str, *, delete: bool) -> None:
    """`path` (an archive) has the sha256 `expected`, if one is given; `delete`: remove its folder if not."""
    from spade.data.fingerprint import file_digest

    if expected is None:
        return
    if path.is_dir():
        raise SpadeError(f"{source}: --sha256 checks an archive file, and this is a folder; leave it out")
    actual = file_digest(path)
    if actual != expected:
        if delete:
            shutil.rmtree(path.parent, ignore_errors=True)
        raise SpadeError(
            f"{source}: sha256 mismatch: expected {expected}, got {actual}; the download was deleted. "
            "Check the URL and the --sha256 value"
            if delete
            else f"{source}: sha256 mismatch: expected {expected}, got {actual}; check the file and --sha256"
        )


# --------------------------------------------------------------------------- safe extraction


@dataclass(frozen=True)
class ExtractLimits:
    """How much an archive may unpack to (params.yaml `fetch`; `spade fetch --max-bytes/--max-entries/--max-ratio`).

    `max_ratio` bounds the expanded bytes per byte of the archive file: real datasets are photos and label
    PNGs that are compressed already (about 1x), a zip or gzip bomb expands a thousandfold. The sizes in the
    archive's headers are checked before anything is written, the bytes actually written while they stream.
    """

    max_bytes: int = 100 * 2**30  # 100 GiB: COCO-Stuff (about 20 GB) and Cityscapes fit
    max_entries: int = 1_000_000
    max_ratio: float = 100.0

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_entries < 1 or not (0 < self.max_ratio < math.inf):
            raise SpadeError(f"extraction limits must be positive finite numbers: {self}")

    def budget(self, archive_bytes: int) -> tuple[int, str]:
        """The most bytes an archive of `archive_bytes` may expand to, and the option that sets it."""
        by_ratio = int(self.max_ratio * max(archive_bytes, 1))
        if by_ratio < self.max_bytes:
            return by_ratio, f"--max-ratio (params.yaml fetch.max_ratio; now {self.max_ratio:g}x the archive's size)"
        return self.max_bytes, f"--max-bytes (params.yaml fetch.max_bytes; now {format_size(self.max_bytes)})"


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str | int) -> int:
    """A byte count: 1000, 500M, 100G, 2T (binary units; a trailing B or iB is allowed)."""
    value = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        number = -1.0
    if not (math.isfinite(number) and number * _UNITS[unit] >= 1):
        raise SpadeError(f"not a size: {text!r} (a byte count such as 1000000, 500M, 100G)")
    return int(number * _UNITS[unit])


def _size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except SpadeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.1f} {unit}iB"
    return f"{n} B"


def _safe_parts(name: str, source: str) -> tuple[str, ...]:
    """An entry name as path parts below the target, refusing absolute names and names that climb out."""
    clean = name.replace("\\", "/")
    parts = PurePosixPath(clean).parts
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        raise SpadeError(f"{source}: refused entry {name!r}: an absolute path")
    if not parts and clean.rstrip("/") != ".":
        raise SpadeError(f"{source}: refused entry {name!r}: an empty name")
    if ".." in parts:
        raise SpadeError(f"{source}: refused entry {name!r}: it would land outside the dataset folder")
    return tuple(p for p in parts if p != ".")  # () is the top folder itself, as `tar -C DIR .` writes it


def _safe_target(root: Path, name: str, source: str) -> Path:
    """root/name, refusing names that are absolute or climb out of root."""
    return root.joinpath(*_safe_parts(name, source))


def _inside(root: Path, path: str) -> bool:
    return os.path.normpath(path).startswith(str(root) + os.sep) or os.path.normpath(path) == str(root)


MAX_LINK_HOPS = 40  # as Linux follows at most 40 links in one lookup


class _Plan:
    """The tree an archive will create, built from its entries before anything is written.

    Every entry is checked against the tree as it stands when the entry is reached: no name may pass
    through a link the archive made or through one of its files, no name may come twice, and the limits
    hold. Links are resolved at the end against the whole planned tree (links through links included), so
    a chain such as `a -> b/..`, `b -> ..` is seen for what the operating system will make of it.
    """

    def __init__(self, source: str, limits: ExtractLimits, archive_bytes: int) -> None:
        self.source, self.limits = source, limits
        self.kinds: dict[tuple[str, ...], str] = {(): "dir"}  # "dir", "file" or "link"
        self.links: dict[tuple[str, ...], tuple[str, str]] = {}  # path -> (target, entry name)
        self.sizes: dict[tuple[str, ...], int] = {}  # files' sizes, for hard links to them
        self.entries = 0
        self.bytes = 0
        self.budget, self.budget_option = limits.budget(archive_bytes)

    def refuse(self, name: str, why: str) -> SpadeError:
        return SpadeError(f"{self.source}: refused entry {name!r}: {why}")

    def count(self, nbytes: int) -> None:
        """`nbytes` more to write (a header's size, or bytes streamed): stop once over the budget."""
        self.bytes += nbytes
        if self.bytes > self.budget:
            raise SpadeError(
                f"{self.source}: the archive expands to more than {format_size(self.budget)}, its limit, so it "
                f"was not unpacked (an archive bomb, or a dataset larger than expected). If it is trusted, raise "
                f"the limit with {self.budget_option}"
            )

    def add(self, name: str, kind: str, size: int = 0, link: str | None = None) -> tuple[str, ...]:
        """Plan entry `name` of `kind` ("dir", "file", "link", "hardlink"); returns its path parts."""
        parts = _safe_parts(name, self.source)
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise SpadeError(
                f"{self.source}: the archive holds more than {self.limits.max_entries} entries, its limit, so it "
                "was not unpacked. If it is trusted, raise the limit with --max-entries "
                "(params.yaml fetch.max_entries)"
            )
        for depth in range(1, len(parts)):
            above = self.kinds.get(parts[:depth])
            if above == "link":
                raise self.refuse(name, f"it goes through the link {'/'.join(parts[:depth])}")
            if above == "file":
                raise self.refuse(name, f"{'/'.join(parts[:depth])} is a file of the archive, not a folder")
        if parts in self.kinds and not (kind == "dir" and self.kinds[parts] == "dir"):
            raise self.refuse(name, "a second entry of that name")
        if kind == "hardlink":
            clean = (link or "").replace("\\", "/")
            if not clean or clean.startswith("/") or ".." in PurePosixPath(clean).parts:
                raise self.refuse(name, f"a hard link to {link} outside it")
            target = tuple(p for p in PurePosixPath(clean).parts if p != ".")
            if self.kinds.get(target) != "file":
                raise self.refuse(name, f"a hard link to {link}, which is no file that comes before it in the archive")
            size = self.sizes[target]
            kind = "file"
        self.count(size)
        for depth in range(1, len(parts)):
            self.kinds.setdefault(parts[:depth], "dir")
        self.kinds[parts] = kind
        if kind == "file":
            self.sizes[parts] = size
        if kind == "link":
            if not link or link.startswith("/") or (len(link) > 1 and link[1] == ":"):
                raise self.refuse(name, f"a link to {link} outside it")
            self.links[parts] = (link, name)
        return parts

    def resolve(self, parts: tuple[str, ...], budget: list[int] | None = None) -> tuple[str, ...] | None:
        """Where `parts` leads inside the planned tree, links followed; None when it leaves it, or when the
        lookup follows more than MAX_LINK_HOPS links in all (a loop, or a chain built to take exponential
        time: the budget is shared by the whole lookup, as the kernel counts)."""
        budget = [MAX_LINK_HOPS] if budget is None else budget
        here: list[str] = []
        for part in parts:
            if part in ("", "."):
                continue
            if part == "..":
                if not here:
                    return None
                here.pop()
                continue
            here.append(part)
            if tuple(here) in self.links:
                budget[0] -= 1
                if budget[0] < 0:
                    return None
                target = self.links[tuple(here)][0].replace("\\", "/")
                landed = self.resolve((*here[:-1], *PurePosixPath(target).parts), budget)
                if landed is None:
                    return None
                here = list(landed)
        return tuple(here)

    def check_links(self) -> None:
        for parts, (target, name) in self.links.items():
            if self.resolve((*parts[:-1], *PurePosixPath(target.replace("\\", "/")).parts)) is None:
                raise self.refuse(
                    name, f"a link to {target} outside it (or a loop, or a chain of more than {MAX_LINK_HOPS} links)"
                )


# What a damaged archive can raise from deep inside zipfile, tarfile and the decompressors.
_DAMAGED = (
    zipfile.BadZipFile,
    tarfile.TarError,
    OSError,
    EOFError,
    UnicodeDecodeError,
    ValueError,
    RuntimeError,  # an encrypted zip entry
    NotImplementedError,  # a zip compression method Python lacks
    zlib.error,
    lzma.LZMAError,
)
MAX_TAR_METADATA = 1 << 20  # a GNU long name or a pax header is read whole: 1 MiB is far more than any needs
TAIL_CHECK = 1 << 20  # how much of a tar past its last entry is read to tell its end from damage


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a GNU long-name record or a pax header into memory whole, before any entry can be
    checked: a header claiming gigabytes would be read as such. These are refused past MAX_TAR_METADATA."""

    def _proc_gnulong(self, tarfile_obj):  # noqa: ANN001, ANN202
        self._check_metadata_size()
        return super()._proc_gnulong(tarfile_obj)

    def _proc_pax(self, tarfile_obj):  # noqa: ANN001, ANN202
        self._check_metadata_size()
        return super()._proc_pax(tarfile_obj)

    def _check_metadata_size(self) -> None:
        if self.size > MAX_TAR_METADATA:
            raise tarfile.ReadError(f"a metadata header of {self.size} bytes (at most {MAX_TAR_METADATA})")


def _is_tar(archive: Path, source: str) -> bool:
    """Whether `archive` opens as a tar (plain or compressed): its first header is read, within bounds."""
    try:
        with tarfile.open(archive, tarinfo=_BoundedTarInfo):
            return True
    except tarfile.ReadError as exc:
        if "metadata header" in str(exc):
            raise SpadeError(
                f"{source}: refused: a tar metadata header (a long name or pax record) larger than "
                f"{format_size(MAX_TAR_METADATA)}, which no dataset needs"
            ) from None
        return False
    except _DAMAGED:
        return False


def _extract(archive: Path, tmp: Path, source: str, limits: ExtractLimits | None = None) -> None:
    """Unpack `archive` into the new folder `tmp`: every entry is planned and checked before one is written."""
    if archive.is_dir():  # an s3:// prefix, already downloaded
        return
    limits = limits or ExtractLimits()
    tmp.mkdir(parents=True)
    root = tmp.resolve()
    plan = _Plan(source, limits, archive.stat().st_size)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, root, plan)
    elif _is_tar(archive, source):
        _extract_tar(archive, root, plan)
    else:
        raise SpadeError(f"{source}: not an archive (zip, tar, tar.gz, tar.bz2, tar.xz) nor a folder")
    _check_links(root, source)


def _check_real(root: Path, dest: Path, plan: _Plan, name: str) -> None:
    """Before writing `dest`: its deepest existing folder really is inside `root` (a backstop for what the
    plan cannot see, such as a file system that folds case, where `A` and `a` are one folder)."""
    if dest == root:
        return
    folder = dest.parent
    while not folder.exists() and folder != root:
        folder = folder.parent
    if not _inside(root, os.path.realpath(folder)):
        raise plan.refuse(name, "it goes through a link out of the dataset folder")


def _extract_tar(archive: Path, root: Path, plan: _Plan) -> None:
    source = plan.source
    try:
        with tarfile.open(archive, tarinfo=_BoundedTarInfo) as tar:
            members = []
            for m in tar:  # headers one by one: a bomb stops at the first member past the budget
                if m.issparse():  # its map of chunks, not its size, decides how much is written
                    raise plan.refuse(m.name, "a sparse file (not supported: pack the dataset without --sparse)")
                if m.ischr() or m.isblk() or m.isfifo() or not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                    raise plan.refuse(m.name, "a device or special file")
                kind = "dir" if m.isdir() else "link" if m.issym() else "hardlink" if m.islnk() else "file"
                plan.add(m.name, kind, m.size if m.isfile() else 0, m.linkname if (m.issym() or m.islnk()) else None)
                members.append(m)
            _check_tar_end(tar, plan, members)
            plan.check_links()
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            for m in members:  # tar headers tell the true sizes: what was counted above is what is written
                _check_real(root, root.joinpath(*_safe_parts(m.name, source)), plan, m.name)
                tar.extract(m, root, **kwargs)
    except SpadeError:
        raise
    except _DAMAGED as exc:
        raise SpadeError(f"{source}: cannot extract {archive.name}: {type(exc).__name__}: {exc}") from None


def _check_tar_end(tar: tarfile.TarFile, plan: _Plan, members: list) -> None:
    """tarfile stops quietly at a damaged header after the first: what follows the last entry must be the
    archive's end (zero blocks), else the archive is damaged and its entries from there on would be lost."""
    tar.fileobj.seek(tar.offset)
    tail = tar.fileobj.read(TAIL_CHECK)
    if tail.strip(b"\0"):
        after = f"after entry {members[-1].name!r}" if members else "at its start"
        raise SpadeError(
            f"{plan.source}: the archive is damaged {after} (data where its end should be); download or pack it again"
        )


MAX_LINK_TARGET = 4096


def _extract_zip(archive: Path, root: Path, plan: _Plan) -> None:
    source = plan.source
    try:
        with zipfile.ZipFile(archive) as zf:
            steps = []
            for info in zf.infolist():
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    if info.file_size > MAX_LINK_TARGET:
                        raise plan.refuse(info.filename, f"a link whose target is {info.file_size} bytes long")
                    link = zf.read(info).decode()
                    if "\0" in link:
                        raise plan.refuse(info.filename, "a link whose target holds a NUL byte")
                    steps.append((plan.add(info.filename, "link", 0, link), info, link))
                elif stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise plan.refuse(info.filename, "a device or special file")
                elif info.is_dir():
                    steps.append((plan.add(info.filename, "dir"), info, None))
                else:
                    steps.append((plan.add(info.filename, "file", info.file_size), info, None))
            plan.check_links()
            plan.bytes = 0  # from here on, the bytes really written are counted (a header may understate them)
            for parts, info, link in steps:
                dest = root.joinpath(*parts)
                _check_real(root, dest, plan, info.filename)
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                if link is not None:
                    os.symlink(link, dest)
                    continue
                with zf.open(info) as src, dest.open("xb") as dst:
                    while block := src.read(CHUNK):
                        plan.count(len(block))
                        dst.write(block)
    except SpadeError:
        raise
    except _DAMAGED as exc:
        raise SpadeError(f"{source}: cannot extract {archive.name}: {type(exc).__name__}: {exc}") from None


def _check_links(root: Path, source: str) -> None:
    """Every link in the extracted tree resolves inside it (a last check of what the plan allowed)."""
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(folder) / name
            if path.is_symlink() and not _inside(root, os.path.realpath(path)):
                raise SpadeError(f"{source}: refused entry {path.relative_to(root)}: a link out of the dataset folder")


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="folder, archive, http(s):// or s3:// URL, or flickr:?text=...&count=N")
    parser.add_argument("--out", required=True, help="dataset folder to create (the dataset root afterwards)")
    parser.add_argument("--sha256", help="expected sha256 of the archive file (checked before extraction)")
    parser.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS), help="expected layout (default: auto)")
    parser.add_argument("--force", action="store_true", help="fetch again even if --out already holds this source")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    limits = parser.add_argument_group("limits on what an archive may unpack to (an archive past one is refused)")
    default = ExtractLimits()
    limits.add_argument(
        "--max-bytes",
        type=_size_argument,
        default=default.max_bytes,
        help=f"most bytes in all, e.g. 500M, 100G (default {format_size(default.max_bytes)})",
    )
    limits.add_argument(
        "--max-entries",
        type=int,
        default=default.max_entries,
        help=f"most files, folders and links (default {default.max_entries})",
    )
    limits.add_argument(
        "--max-ratio",
        type=float,
        default=default.max_ratio,
        help=f"most bytes unpacked per byte of the archive (default {default.max_ratio:g})",
    )
    flickr = parser.add_argument_group("flickr: sources (override the flickr:?key=value query)")
    flickr.add_argument("--flickr-text", help="free-text search, e.g. 'mountain lake'")
    flickr.add_argument("--flickr-tags", help="comma-separated tags, e.g. landscape,nature")
    flickr.add_argument("--flickr-license", help="comma-separated licence ids (default 1,2,3,4,5,6,9,10)")
    flickr.add_argument("--flickr-sort", help="relevance (default), interestingness-desc, date-posted-desc, ...")
    flickr.add_argument("--count", type=int, help="photos to download (default 100)")
    flickr.add_argument("--size", help="url_<size> to download: z (640 px, default), c (800), b (1024), o, ...")
    flickr.add_argument("--rate", type=float, help="most Flickr requests per second (default: $FLICKR_RATE or 1)")
    flickr.add_argument(
        "--flickr-endpoint", help="REST endpoint (default: $FLICKR_ENDPOINT or https://api.flickr.com/services/rest/)"
    )


def main(args: argparse.Namespace) -> int:
    result = fetch_dataset(
        args.source,
        args.out,
        sha256=args.sha256,
        layout=args.layout,
        force=args.force,
        progress=not args.no_progress,
        limits=ExtractLimits(args.max_bytes, args.max_entries, args.max_ratio),
        **{name: getattr(args, name) for name in FLICKR_OPTIONS},
    )
    print(json.dumps(result.to_dict(), indent=2))
    if result.needs_labels:
        images = result.path / "images" if (result.path / "images").is_dir() else result.path
        print(
            f"next: spade pseudolabel --images {images} --recursive ... (the photos need label maps)", file=sys.stderr
        )
    return 0
