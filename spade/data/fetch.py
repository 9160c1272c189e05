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

Archives (zip, tar, tar.gz / tgz, tar.bz2, tar.xz; told apart by content) are extracted safely: an entry
that would land outside the target (`..`, absolute paths, links pointing out of it) or a device file is
refused with an error naming it. Extraction goes to a temporary folder beside OUT that is renamed to OUT
once complete, so OUT is never a half-extracted dataset. An archive holding one top folder is entered.

OUT is the dataset root afterwards, with `fetch.json` (the FetchResult) and a `.spade-fetch` marker
(source + sha256): fetching the same source into it again does nothing unless `force`. Layouts:
coco, ade20k, cityscapes, custom (classes.txt) and photos (unlabelled images for `spade pseudolabel`).
"""

from __future__ import annotations

import argparse
import json
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
) -> FetchResult:
    """Fetch `source` (see the module doc) into the folder `out`; returns what is there.

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
            _extract(archive, tmp, source)
        else:
            local = Path(source).expanduser()
            if not (local.is_dir() or local.is_file()):
                raise SpadeError(f"source not found: {source} (a folder, archive, http(s)://, s3:// or flickr: URL)")
            _check_sha256(local, sha256, source, delete=False)
            if local.is_dir():
                _copy_tree(local, tmp)
            else:
                _extract(local, tmp, source)
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


def _safe_target(root: Path, name: str, source: str) -> Path:
    """root/name, refusing names that are absolute or climb out of root."""
    clean = name.replace("\\", "/")
    parts = PurePosixPath(clean).parts
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        raise SpadeError(f"{source}: refused entry {name!r}: an absolute path")
    if not parts:
        if clean.rstrip("/") == ".":
            return root  # the top folder itself, as `tar -C DIR .` writes it
        raise SpadeError(f"{source}: refused entry {name!r}: an empty name")
    if ".." in parts:
        raise SpadeError(f"{source}: refused entry {name!r}: it would land outside the dataset folder")
    return root.joinpath(*[p for p in parts if p != "."])


def _inside(root: Path, path: str) -> bool:
    return os.path.normpath(path).startswith(str(root) + os.sep) or os.path.normpath(path) == str(root)


def _extract(archive: Path, tmp: Path, source: str) -> None:
    if archive.is_dir():  # an s3:// prefix, already downloaded
        return
    tmp.mkdir(parents=True)
    root = tmp.resolve()
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, root, source)
    elif tarfile.is_tarfile(archive):
        _extract_tar(archive, root, source)
    else:
        raise SpadeError(f"{source}: not an archive (zip, tar, tar.gz, tar.bz2, tar.xz) nor a folder")
    _check_links(root, source)


def _extract_tar(archive: Path, root: Path, source: str) -> None:
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            links: set[str] = set()
            for m in members:
                dest = _safe_target(root, m.name, source)
                rel = dest.relative_to(root).as_posix()
                if any(rel == link or rel.startswith(link + "/") for link in links):
                    raise SpadeError(f"{source}: refused entry {m.name!r}: it goes through the link {rel}")
                if m.ischr() or m.isblk() or m.isfifo() or not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                    raise SpadeError(f"{source}: refused entry {m.name!r}: a device or special file")
                if m.issym():
                    if m.linkname.startswith("/") or not _inside(root, os.path.join(dest.parent, m.linkname)):
                        raise SpadeError(f"{source}: refused entry {m.name!r}: a link to {m.linkname} outside it")
                    links.add(rel)
                elif m.islnk():
                    link = m.linkname.replace("\\", "/")
                    if not link or link.startswith("/") or ".." in PurePosixPath(link).parts:
                        raise SpadeError(f"{source}: refused entry {m.name!r}: a hard link to {m.linkname} outside it")
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(root, members=members, **kwargs)
    except SpadeError:
        raise
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SpadeError(f"{source}: cannot extract {archive.name}: {exc}") from None


def _extract_zip(archive: Path, root: Path, source: str) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            plan = []
            for info in infos:
                dest = _safe_target(root, info.filename, source)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    link = zf.read(info).decode()
                    if link.startswith("/") or not _inside(root, os.path.join(dest.parent, link)):
                        raise SpadeError(f"{source}: refused entry {info.filename!r}: a link to {link} outside it")
                    plan.append((info, dest, link))
                elif stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise SpadeError(f"{source}: refused entry {info.filename!r}: a device or special file")
                else:
                    plan.append((info, dest, None))
            for info, dest, link in plan:
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                if not _inside(root, os.path.realpath(dest.parent)):
                    raise SpadeError(f"{source}: refused entry {info.filename!r}: it goes through a link out of it")
                if link is not None:
                    os.symlink(link, dest)
                    continue
                with zf.open(info) as src, dest.open("xb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
    except SpadeError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError) as exc:
        raise SpadeError(f"{source}: cannot extract {archive.name}: {exc}") from None


def _check_links(root: Path, source: str) -> None:
    """Every link in the extracted tree resolves inside it."""
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
        **{name: getattr(args, name) for name in FLICKR_OPTIONS},
    )
    print(json.dumps(result.to_dict(), indent=2))
    if result.needs_labels:
        images = result.path / "images" if (result.path / "images").is_dir() else result.path
        print(
            f"next: spade pseudolabel --images {images} --recursive ... (the photos need label maps)", file=sys.stderr
        )
    return 0
