"""spade.data.fetch: local folders and archives, http(s) with resume, s3:// (a real moto_server), layouts,
checksums, and archives that try to write outside the dataset folder."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from http_helpers import FakeServer, reply
from spade.data import fetch as fetch_mod
from spade.data import flickr as flickr_mod
from spade.data.fetch import ExtractLimits, FetchResult, detect_layout, fetch_dataset
from spade.data.fingerprint import files_fingerprint
from spade.data.synthetic import generate_builtin_dataset
from spade.errors import SpadeError

ARCHIVES = ("zip", "tar", "tar.gz", "tgz", "tar.bz2", "tar.xz")
TAR_MODES = {"tar": "w", "tar.gz": "w:gz", "tgz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz"}


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> Path:
    return generate_builtin_dataset(
        tmp_path_factory.mktemp("builtin") / "landscapes", count=6, val_count=2, size=32, progress=False
    )


def dataset_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def make_archive(folder: Path, dest: Path, kind: str, top: str | None = "landscapes") -> Path:
    """`folder` packed as `dest` (its files under `top/`, or at the archive root)."""
    files = dataset_files(folder)
    arc = lambda p: f"{top}/{p.relative_to(folder).as_posix()}" if top else p.relative_to(folder).as_posix()  # noqa: E731
    if kind == "zip":
        with zipfile.ZipFile(dest, "w") as zf:
            for p in files:
                zf.write(p, arc(p))
    else:
        with tarfile.open(dest, TAR_MODES[kind]) as tf:
            for p in files:
                tf.add(p, arc(p))
    return dest


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def no_leftovers(parent: Path, out_name: str) -> None:
    stray = [p.name for p in parent.iterdir() if p.name.startswith(f".{out_name}.")]
    assert not stray, f"temporary files left behind: {stray}"


# --------------------------------------------------------------------------- local sources


def test_local_folder_is_copied_and_refetch_is_a_no_op(tmp_path, builtin):
    out = tmp_path / "data"
    result = fetch_dataset(str(builtin), out, progress=False)
    assert isinstance(result, FetchResult)
    assert result.path == out and result.layout == "custom" and not result.needs_labels
    assert result.files == len(dataset_files(builtin))
    assert result.fingerprint == files_fingerprint(dataset_files(builtin), builtin)
    assert json.loads((out / "fetch.json").read_text()) == result.to_dict()
    assert (out / "classes.txt").read_text() == (builtin / "classes.txt").read_text()
    no_leftovers(tmp_path, "data")

    marker = out / fetch_mod.MARKER_NAME
    before = marker.stat().st_mtime_ns
    again = fetch_dataset(str(builtin), out, progress=False)
    assert again == result and marker.stat().st_mtime_ns == before  # nothing was done

    (out / "train_img" / "000000.jpg").unlink()
    forced = fetch_dataset(str(builtin), out, force=True, progress=False)
    assert (out / "train_img" / "000000.jpg").is_file() and forced.fingerprint == result.fingerprint


def test_a_foreign_folder_is_not_overwritten(tmp_path, builtin):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(SpadeError, match="not written by spade fetch"):
        fetch_dataset(str(builtin), out, force=True, progress=False)
    assert (out / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("kind", ARCHIVES)
def test_local_archives_are_extracted_into_the_dataset_root(tmp_path, builtin, kind):
    archive = make_archive(builtin, tmp_path / f"landscapes.{kind}", kind)
    out = tmp_path / "out" / "data"
    result = fetch_dataset(str(archive), out, sha256=sha(archive), progress=False)
    assert result.layout == "custom" and result.path == out
    assert (out / "classes.txt").is_file() and (out / "train_label" / "000000.png").is_file()
    assert result.fingerprint == files_fingerprint(dataset_files(builtin), builtin)
    no_leftovers(out.parent, "data")


def test_archive_without_a_top_folder_and_explicit_layout(tmp_path, builtin):
    archive = make_archive(builtin, tmp_path / "flat.zip", "zip", top=None)
    result = fetch_dataset(str(archive), tmp_path / "d", layout="custom", progress=False)
    assert result.layout == "custom" and (tmp_path / "d" / "classes.txt").is_file()
    with pytest.raises(SpadeError, match="not in the cityscapes layout"):
        fetch_dataset(str(archive), tmp_path / "e", layout="cityscapes", progress=False)
    assert not (tmp_path / "e").exists()
    no_leftovers(tmp_path, "e")


def test_tar_of_dot_and_refetch_of_another_source_replaces(tmp_path, builtin):
    archive = tmp_path / "dot.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(builtin, ".")  # members ".", "./classes.txt", ... as `tar -C DIR .` writes them
    first = fetch_dataset(str(archive), tmp_path / "d", progress=False)
    assert first.layout == "custom" and (tmp_path / "d" / "classes.txt").is_file()
    photos = tmp_path / "photos"
    touch(photos, "a.jpg", "b.png")
    second = fetch_dataset(str(photos), tmp_path / "d", progress=False)  # another source: replaced
    assert second.layout == "photos" and second.files == 2 and not (tmp_path / "d" / "classes.txt").exists()
    no_leftovers(tmp_path, "d")


def test_local_sha256_mismatch_extracts_nothing(tmp_path, builtin):
    archive = make_archive(builtin, tmp_path / "a.tar.gz", "tar.gz")
    with pytest.raises(SpadeError, match="sha256 mismatch"):
        fetch_dataset(str(archive), tmp_path / "d", sha256="0" * 64, progress=False)
    assert not (tmp_path / "d").exists()
    no_leftovers(tmp_path, "d")
    with pytest.raises(SpadeError, match="64 hex digits"):
        fetch_dataset(str(archive), tmp_path / "d", sha256="abc", progress=False)
    with pytest.raises(SpadeError, match="--sha256 checks an archive file, and this is a folder"):
        fetch_dataset(str(builtin), tmp_path / "d", sha256="0" * 64, progress=False)
    assert not (tmp_path / "d").exists()
    no_leftovers(tmp_path, "d")


def test_missing_source_and_non_archive(tmp_path):
    with pytest.raises(SpadeError, match="source not found"):
        fetch_dataset(str(tmp_path / "nope"), tmp_path / "d", progress=False)
    (tmp_path / "x.bin").write_bytes(b"not an archive at all")
    with pytest.raises(SpadeError, match="not an archive"):
        fetch_dataset(str(tmp_path / "x.bin"), tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- layouts


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"\x89PNG fake")


SKELETONS = {
    "coco": ("train_img/000000000009.jpg", "train_label/000000000009.png", "train_inst/000000000009.png"),
    "ade20k": ("images/training/ADE_train_00000001.jpg", "annotations/training/ADE_train_00000001.png"),
    "cityscapes": (
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
        "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png",
        "gtFine/train/aachen/aachen_000000_000019_gtFine_instanceIds.png",
    ),
    "custom": ("classes.txt", "val_img/a.jpg", "val_label/a.png"),
    "photos": ("images/lake.jpg", "images/sub/peak.png"),
}


@pytest.mark.parametrize("layout", sorted(SKELETONS))
def test_layouts_are_recognised(tmp_path, layout):
    src = tmp_path / "src" / "top"
    touch(src, *SKELETONS[layout])
    assert detect_layout(src) == layout
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(src, "top")
    result = fetch_dataset(str(archive), tmp_path / "d", progress=False)
    assert result.layout == layout and result.needs_labels == (layout == "photos")
    assert result.files == len(SKELETONS[layout])


def test_labels_only_archive_is_not_a_photo_collection(tmp_path):
    touch(tmp_path / "src", "gtFine/train/aachen/a_gtFine_labelIds.png", "README")
    with pytest.raises(SpadeError, match="no known dataset layout"):
        detect_layout(tmp_path / "src")


def test_unknown_layout_names_what_is_there(tmp_path):
    touch(tmp_path / "src", "readme.md", "stuff/a.txt")
    with pytest.raises(SpadeError, match=r"no known dataset layout \(it holds readme.md, stuff/\)"):
        fetch_dataset(str(tmp_path / "src"), tmp_path / "d", progress=False)
    with pytest.raises(SpadeError, match="unknown layout"):
        fetch_dataset(str(tmp_path / "src"), tmp_path / "d", layout="kitti", progress=False)


# --------------------------------------------------------------------------- http(s)


class FileServer(FakeServer):
    """Serves one blob at /data/<name>; can ignore Range and drop connections after N bytes."""

    def __init__(self, body: bytes, *, ranges: bool = True, drops: int = 0, drop_after: int = 0) -> None:
        self.body, self.ranges, self.drops, self.drop_after = body, ranges, drops, drop_after
        self.requests: list[dict] = []
        self.failures: list[tuple[int, list[tuple[str, str]]]] = []  # (status, headers) answered first

    def url(self, name: str) -> str:
        return f"{self.base}/data/{name}"

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        self.requests.append({"path": h.path, "range": h.headers.get("Range")})
        if not h.path.startswith("/data/"):
            reply(h, 404)
            return
        if self.failures:
            status, headers = self.failures.pop(0)
            reply(h, status, b"try later", headers)
            return
        status, start, rng = 200, 0, h.headers.get("Range")
        headers = [("ETag", '"v1"')]
        if rng and self.ranges:
            status, start = 206, int(rng.split("=")[1].split("-")[0])
            headers.append(("Content-Range", f"bytes {start}-{len(self.body) - 1}/{len(self.body)}"))
        chunk = self.body[start:]
        if self.drops <= 0:
            reply(h, status, chunk, headers)
            return
        self.drops -= 1  # promise the whole chunk, send a part of it, hang up
        h.send_response(status)
        for name, value in [*headers, ("Content-Length", str(len(chunk)))]:
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(chunk[: self.drop_after])
        h.wfile.flush()
        h.close_connection = True


@pytest.fixture(scope="module")
def archive_tgz(builtin, tmp_path_factory) -> Path:
    return make_archive(builtin, tmp_path_factory.mktemp("arc") / "landscapes.tar.gz", "tar.gz")


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch):
    """Waits are recorded, not slept."""
    waits: list[float] = []
    monkeypatch.setattr(fetch_mod.time, "sleep", waits.append)
    return waits


def test_http_retries_wait_as_the_server_asks_and_give_up_on_final_answers(tmp_path, archive_tgz, _quick_retries):
    with FileServer(archive_tgz.read_bytes()) as server:
        server.failures = [(503, [("Retry-After", "3")]), (429, []), (408, [("Retry-After", "bogus")])]
        result = fetch_dataset(server.url("landscapes.tar.gz"), tmp_path / "d", sha256=sha(archive_tgz), progress=False)
        assert result.layout == "custom"
        # Retry-After when sent, else 0.2 s doubling per attempt (a header that is no delay counts as none)
        assert _quick_retries == [3.0, 0.4, 0.8] and len(server.requests) == 4
        _quick_retries.clear()
        server.failures = [(501, [("Retry-After", "1")])]
        with pytest.raises(SpadeError, match="HTTP 501"):
            fetch_dataset(server.url("landscapes.tar.gz"), tmp_path / "e", progress=False)
        assert _quick_retries == [] and len(server.requests) == 5  # no second try
    no_leftovers(tmp_path, "d")
    no_leftovers(tmp_path, "e")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_http_download_interrupted_mid_way_resumes_or_restarts(tmp_path, archive_tgz, builtin, ranges):
    body = archive_tgz.read_bytes()
    with FileServer(body, ranges=ranges, drops=1, drop_after=len(body) // 3) as server:
        result = fetch_dataset(server.url("landscapes.tar.gz"), tmp_path / "d", sha256=sha(archive_tgz), progress=False)
    assert result.layout == "custom"
    assert result.fingerprint == files_fingerprint(dataset_files(builtin), builtin)
    assert [r["range"] for r in server.requests] == [None, f"bytes={len(body) // 3}-"]
    no_leftovers(tmp_path, "d")


def test_http_part_file_survives_a_failed_run_and_the_next_run_resumes(tmp_path, archive_tgz, monkeypatch):
    monkeypatch.setattr(fetch_mod, "DOWNLOAD_ATTEMPTS", 2)
    body = archive_tgz.read_bytes()
    with FileServer(body, drops=2, drop_after=1000) as server:
        with pytest.raises(SpadeError, match="run again to resume"):
            fetch_dataset(server.url("landscapes.tar.gz"), tmp_path / "d", progress=False)
        part = tmp_path / ".d.fetch" / "landscapes.tar.gz.part"
        assert part.stat().st_size == 2000 and not (tmp_path / "d").exists()
        result = fetch_dataset(server.url("landscapes.tar.gz"), tmp_path / "d", progress=False)
    assert result.layout == "custom"
    assert server.requests[-1]["range"] == "bytes=2000-"
    no_leftovers(tmp_path, "d")


def test_a_torn_part_meta_restarts_the_download_cleanly(tmp_path, archive_tgz, monkeypatch):
    monkeypatch.setattr(fetch_mod, "DOWNLOAD_ATTEMPTS", 1)
    body = archive_tgz.read_bytes()
    with FileServer(body, drops=1, drop_after=1000) as server:
        with pytest.raises(SpadeError, match="run again to resume"):
            fetch_dataset(server.url("landscapes.tar.gz"), tmp_path / "d", progress=False)
        part = tmp_path / ".d.fetch" / "landscapes.tar.gz.part"
        meta = part.with_name(part.name + ".meta")
        assert json.loads(meta.read_text()) == {"etag": '"v1"', "last_modified": None}  # written whole
        assert sorted(p.name for p in part.parent.iterdir()) == [part.name, meta.name]
        meta.write_text('{"etag": "\\"v')  # torn: whose download the part is cannot be told
        result = fetch_dataset(server.url("landscapes.tar.gz"), tmp_path / "d", sha256=sha(archive_tgz), progress=False)
    assert result.layout == "custom"
    assert server.requests[-1]["range"] is None  # started again, not resumed
    no_leftovers(tmp_path, "d")


def test_http_sha256_mismatch_leaves_nothing(tmp_path, archive_tgz):
    with FileServer(archive_tgz.read_bytes()) as server:
        with pytest.raises(SpadeError, match="sha256 mismatch.*deleted"):
            fetch_dataset(server.url("landscapes.tar.gz"), tmp_path / "d", sha256="f" * 64, progress=False)
        with pytest.raises(SpadeError, match="HTTP 404"):
            fetch_dataset(server.url("x").replace("/data/", "/nope/"), tmp_path / "d", progress=False)
    assert sorted(os.listdir(tmp_path)) == []


# --------------------------------------------------------------------------- s3://


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    from train_helpers import moto_s3

    with moto_s3(tmp_path_factory.mktemp("moto"), "datasets") as (env, client):
        yield env, client


def test_s3_archive_and_folder(tmp_path, s3_env, builtin, archive_tgz, monkeypatch):
    env, client = s3_env
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client.upload_file(str(archive_tgz), "datasets", "archives/landscapes.tar.gz")
    for p in dataset_files(builtin):
        client.upload_file(str(p), "datasets", f"folders/landscapes/{p.relative_to(builtin).as_posix()}")
    expected = files_fingerprint(dataset_files(builtin), builtin)

    a = fetch_dataset(
        "s3://datasets/archives/landscapes.tar.gz", tmp_path / "a", sha256=sha(archive_tgz), progress=False
    )
    b = fetch_dataset("s3://datasets/folders/landscapes/", tmp_path / "b", progress=False)
    assert (a.layout, b.layout) == ("custom", "custom")
    assert a.fingerprint == b.fingerprint == expected
    with pytest.raises(SpadeError, match="nothing under that prefix"):
        fetch_dataset("s3://datasets/missing", tmp_path / "c", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


# --------------------------------------------------------------------------- archive attacks


def tar_with(path: Path, *members: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("data/ok.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        for m in members:
            tf.addfile(m, io.BytesIO(b"x" * m.size) if m.isfile() else None)
    return path


def info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, link
    m.size = 1 if kind == tarfile.REGTYPE else 0
    return m


ATTACKS = {
    "dotdot": (info("../evil"), "../evil"),
    "nested-dotdot": (info("data/../../evil"), "data/../../evil"),
    "absolute": (info("/tmp/abs-evil"), "/tmp/abs-evil"),
    "member-named-dotdot": (info("..", tarfile.DIRTYPE), "'..'"),
    "symlink-to-etc": (info("data/etc", tarfile.SYMTYPE, "/etc"), "data/etc"),
    "symlink-up": (info("data/up", tarfile.SYMTYPE, "../../.."), "data/up"),
    "hardlink-out": (info("data/h", tarfile.LNKTYPE, "../outside"), "data/h"),
    "device": (info("data/dev", tarfile.CHRTYPE), "data/dev"),
    "fifo": (info("data/fifo", tarfile.FIFOTYPE), "data/fifo"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_tar_attacks_are_refused_and_nothing_is_written(tmp_path, attack):
    member, shown = ATTACKS[attack]
    box = tmp_path / "box"
    box.mkdir()
    archive = tar_with(box / "evil.tar", member)
    with pytest.raises(SpadeError, match="refused entry") as err:
        fetch_dataset(str(archive), box / "out", progress=False)
    assert shown.strip("'") in str(err.value) and str(archive) in str(err.value)
    assert sorted(os.listdir(box)) == ["evil.tar"]
    assert sorted(os.listdir(tmp_path)) == ["box"]
    assert not Path("/tmp/abs-evil").exists()


def test_links_through_a_symlink_are_refused(tmp_path):
    box = tmp_path / "box"
    box.mkdir()
    archive = tar_with(box / "evil.tar", info("data/inner", tarfile.SYMTYPE, "."), info("data/inner/../../../x"))
    with pytest.raises(SpadeError, match="refused entry"):
        fetch_dataset(str(archive), box / "out", progress=False)
    archive = tar_with(box / "evil2.tar", info("data/sub", tarfile.SYMTYPE, "."), info("data/sub/f.txt"))
    with pytest.raises(SpadeError, match="goes through the link"):
        fetch_dataset(str(archive), box / "out", progress=False)
    assert sorted(os.listdir(box)) == ["evil.tar", "evil2.tar"]


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt"])
def test_zip_attacks_are_refused(tmp_path, name):
    box = tmp_path / "box"
    box.mkdir()
    archive = box / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/ok.txt", "ok")
        zf.writestr(zipfile.ZipInfo(name), "evil")
    with pytest.raises(SpadeError, match="refused entry") as err:
        fetch_dataset(str(archive), box / "out", progress=False)
    assert name in str(err.value)
    assert sorted(os.listdir(box)) == ["evil.zip"] and sorted(os.listdir(tmp_path)) == ["box"]


def test_zip_symlink_out_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo("data/etc")
        link.external_attr = (0o120777 << 16) | 0x20
        zf.writestr(link, "/etc")
    with pytest.raises(SpadeError, match="refused entry 'data/etc': a link to /etc"):
        fetch_dataset(str(archive), tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["evil.zip"]


def test_links_inside_the_dataset_are_kept(tmp_path):
    touch(tmp_path / "src" / "images", "a.jpg")
    archive = tmp_path / "ok.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(tmp_path / "src" / "images" / "a.jpg", "top/images/a.jpg")
        tf.addfile(info("top/images/b.jpg", tarfile.SYMTYPE, "a.jpg"))
        tf.addfile(info("top/images/c.jpg", tarfile.LNKTYPE, "top/images/a.jpg"))
    result = fetch_dataset(str(archive), tmp_path / "d", progress=False)
    # top/ and then images/ are single folders: both are entered
    assert result.layout == "photos" and (tmp_path / "d" / "b.jpg").is_symlink() and result.files == 3
    assert (tmp_path / "d" / "c.jpg").read_bytes() == b"\x89PNG fake"


# --------------------------------------------------------------------------- command line


def test_cli_main(tmp_path, builtin, capsys):
    """`spade fetch` as the command line runs it: its help carries the examples, errors name the options."""
    from spade.cli import main

    assert main(["fetch", str(builtin), "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["layout"] == "custom" and printed["path"] == str(tmp_path / "d")
    assert main(["fetch", str(builtin), "--out", str(tmp_path / "e"), "--count", "3"]) == 1
    assert "error: --count only apply to flickr: sources" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    with pytest.raises(SystemExit) as done:
        main(["fetch", "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    assert "--flickr-license" in help_text and 'spade fetch "flickr:?text=mountain+lake' in help_text


def test_fetch_modules_import_nothing_heavy_at_module_level():
    """`spade --help` stays fast: torch and friends are imported inside functions only."""
    import ast

    for module in (fetch_mod, flickr_mod):
        tree = ast.parse(Path(module.__file__).read_text())
        names = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        heavy = {n for n in names if n.split(".")[0] in ("torch", "numpy", "PIL", "boto3", "tqdm", "requests")}
        assert not heavy and names & {"spade.data", "spade.data.layouts", "spade.labels"} == set(), names


# --------------------------------------------------------------------------- archive bombs and link chains

BOMB_BYTES = 64 * 2**20  # 64 MiB of zeros: deflate packs it into about 64 KiB (a thousandfold)


def bomb(path: Path, kind: str, members: int = 1) -> Path:
    """An archive of `members` files of zeros, BOMB_BYTES in all, beside a real little text file."""
    each = BOMB_BYTES // members
    zeros = bytes(each)
    if kind == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("data/ok.txt", "ok")
            for i in range(members):
                zf.writestr(f"data/zeros{i}.bin", zeros)
    else:
        with tarfile.open(path, TAR_MODES[kind]) as tf:
            for i in range(members):
                m = tarfile.TarInfo(f"data/zeros{i}.bin")
                m.size = each
                tf.addfile(m, io.BytesIO(zeros))
    return path


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_archive_bomb_is_refused_before_anything_is_written(tmp_path, kind):
    box = tmp_path / "box"
    box.mkdir()
    archive = bomb(box / f"bomb.{kind}", kind)
    ratio = BOMB_BYTES / archive.stat().st_size
    assert ratio > 500  # what makes it a bomb: far past the default of 100x
    with pytest.raises(SpadeError) as err:
        fetch_dataset(str(archive), box / "out", progress=False)
    msg = str(err.value)
    assert msg.startswith(f"{archive}: the archive expands to more than") and "--max-ratio" in msg
    assert "params.yaml fetch.max_ratio" in msg
    assert everything_under(tmp_path) == ["box", f"box/bomb.{kind}"]  # no partial output, no work folder

    # a trusted archive passes with a larger ratio, and is then held to the total
    with pytest.raises(SpadeError, match=r"more than 32\.0 MiB.*--max-bytes \(params.yaml fetch.max_bytes"):
        fetch_dataset(str(archive), box / "out", progress=False, limits=ExtractLimits(32 * 2**20, 10, 10_000))
    assert everything_under(tmp_path) == ["box", f"box/bomb.{kind}"]
    tree = box / "tree"  # the bomb is no dataset (no layout to detect): its extraction alone, within limits
    fetch_mod._extract(archive, tree, str(archive), ExtractLimits(2 * BOMB_BYTES, 10, 10_000))
    assert (tree / "data" / "zeros0.bin").stat().st_size == BOMB_BYTES


def test_a_bomb_of_many_members_stops_at_the_first_past_the_budget(tmp_path, monkeypatch):
    """Checked while streaming: the tar headers are read one by one and extraction stops at the member that
    crosses the budget; the members after it are never decompressed."""
    archive = bomb(tmp_path / "many.tar.gz", "tar.gz", members=64)  # 1 MiB each
    seen = []
    real_next = tarfile.TarFile.next

    def counting_next(self):
        member = real_next(self)
        if member is not None:
            seen.append(member.name)
        return member

    monkeypatch.setattr(tarfile.TarFile, "next", counting_next)
    limits = ExtractLimits(max_bytes=8 * 2**20, max_entries=1000, max_ratio=10_000)
    with pytest.raises(SpadeError, match=r"more than 8\.0 MiB"):
        fetch_dataset(str(archive), tmp_path / "out", progress=False, limits=limits)
    # 8 members fit, the 9th crosses: nothing after it was read (the first header is read more than once:
    # telling a tar file from others reads it)
    assert sorted(set(seen)) == sorted(f"data/zeros{i}.bin" for i in range(9))
    assert everything_under(tmp_path) == ["many.tar.gz"]


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_too_many_entries_are_refused_naming_the_option(tmp_path, builtin, kind):
    archive = make_archive(builtin, tmp_path / f"d.{kind}", kind)
    entries = len(dataset_files(builtin))
    with pytest.raises(SpadeError, match=f"more than {entries - 1} entries.*--max-entries"):
        fetch_dataset(str(archive), tmp_path / "out", progress=False, limits=ExtractLimits(max_entries=entries - 1))
    assert everything_under(tmp_path) == [f"d.{kind}"]
    # folders count as entries in a tar made with `tar -c` and not in this one: the files decide here
    result = fetch_dataset(str(archive), tmp_path / "out", progress=False, limits=ExtractLimits(max_entries=entries))
    assert result.files == entries


def test_fetch_cli_takes_the_limits(tmp_path, capsys):
    from spade.cli import main

    archive = bomb(tmp_path / "bomb.zip", "zip")
    assert main(["fetch", str(archive), "--out", str(tmp_path / "d"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--max-ratio" in err and "Traceback" not in err
    code = main(["fetch", str(archive), "--out", str(tmp_path / "d"), "--max-ratio", "5000", "--max-bytes", "1M"])
    assert code == 1 and "more than 1.0 MiB" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["fetch", str(archive), "--out", str(tmp_path / "d"), "--max-bytes", "lots"])
    assert done.value.code == 2
    assert "not a size: 'lots'" in capsys.readouterr().err
    assert fetch_mod.parse_size("100G") == 100 * 2**30 and fetch_mod.parse_size("1.5MiB") == 3 * 2**19
    assert everything_under(tmp_path) == ["bomb.zip"]


def zip_with_links(path: Path, *entries: tuple[str, str | None]) -> Path:
    """A zip of (name, link target) entries: a symlink where a target is given, else a small file."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, target in entries:
            if target is None:
                zf.writestr(name, "data")
            else:
                link = zipfile.ZipInfo(name)
                link.external_attr = (0o120777 << 16) | 0x20
                zf.writestr(link, target)
    return path


def tar_with_links(path: Path, *entries: tuple[str, str | None]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, target in entries:
            if target is None:
                m = tarfile.TarInfo(name)
                m.size = 4
                tf.addfile(m, io.BytesIO(b"data"))
            else:
                tf.addfile(info(name, tarfile.SYMTYPE, target))
    return path


CHAINS = {
    # each link alone points inside when read as text; followed as the system follows them, they climb two
    # or three levels above the folder extraction writes to (box/.out.fetch/tree): into box/ or above it
    "up-through-a-link": [("ds/up", ".."), ("ds/e", "up/../.."), ("ds/e/escaped_dir_f/f.txt", None)],
    "two-hops": [("ds/a", "."), ("ds/b", "a/../.."), ("ds/c", "b/../.."), ("ds/c/x/f.txt", None)],
    "link-made-later": [("ds/l", "z/../.."), ("ds/z", ".."), ("ds/l/escaped/f.txt", None)],
    "loop": [("ds/p", "q"), ("ds/q", "p"), ("ds/ok.txt", None)],
}


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_link_chains_out_of_the_folder_create_nothing_anywhere(tmp_path, kind, chain):
    box = tmp_path / "box"
    box.mkdir()
    make = zip_with_links if kind == "zip" else tar_with_links
    archive = make(box / f"chain.{kind}", *CHAINS[chain])
    with pytest.raises(SpadeError, match="refused entry"):
        fetch_dataset(str(archive), box / "out", progress=False)
    # nothing beside the archive, nothing in the work folder, nothing above the box
    assert everything_under(tmp_path) == ["box", f"box/chain.{kind}"]


def test_links_to_links_that_stay_inside_are_kept(tmp_path):
    archive = zip_with_links(
        tmp_path / "ok.zip",
        ("top/images/a.jpg", None),
        ("top/images/b.jpg", "a.jpg"),
        ("top/images/c.jpg", "b.jpg"),
        ("top/images/sub/d.jpg", "../c.jpg"),
    )
    result = fetch_dataset(str(archive), tmp_path / "d", progress=False)
    assert result.layout == "photos" and (tmp_path / "d" / "sub" / "d.jpg").read_text() == "data"


# --------------------------------------------------------------------------- what a review found


def test_a_bomb_is_refused_before_a_single_entry_is_extracted(tmp_path, monkeypatch):
    """Refusal from the headers alone: neither tarfile's nor zipfile's extraction is ever called."""
    bombs = [bomb(tmp_path / f"bomb.{kind}", kind) for kind in ("zip", "tar.gz")]
    calls = []
    monkeypatch.setattr(tarfile.TarFile, "extract", lambda *a, **k: calls.append(("tar", a[1].name)))
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: calls.append(("zip", a[1])))
    for archive in bombs:
        with pytest.raises(SpadeError, match="--max-ratio"):
            fetch_dataset(str(archive), tmp_path / "out", progress=False)
    assert calls == []


def test_a_sparse_tar_entry_is_refused(tmp_path):
    """A sparse entry's map, not its size, says how much tarfile writes: 0 bytes declared, 20 MiB written."""
    m = tarfile.TarInfo("data/holes.bin")
    m.type = tarfile.GNUTYPE_SPARSE
    m.size = 1
    archive = tmp_path / "sparse.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(m, io.BytesIO(b"x"))
    with pytest.raises(SpadeError, match="refused entry 'data/holes.bin': a sparse file"):
        fetch_dataset(str(archive), tmp_path / "out", progress=False)
    assert everything_under(tmp_path) == ["sparse.tar"]


def test_a_huge_tar_metadata_header_is_refused_without_reading_it(tmp_path):
    """A GNU long-name record claiming 300 MiB (gzip makes it 300 KB) is refused from its size."""
    import gzip
    import resource

    header = tarfile.TarInfo("././@LongLink")
    header.type, header.size = tarfile.GNUTYPE_LONGNAME, 300 * 2**20
    raw = header.tobuf(format=tarfile.USTAR_FORMAT)
    archive = tmp_path / "long.tar.gz"
    with gzip.open(archive, "wb") as gz:
        gz.write(raw)
        zeros = bytes(2**20)
        for _ in range(300):
            gz.write(zeros)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(SpadeError, match="a tar metadata header .* larger than 1.0 MiB"):
        fetch_dataset(str(archive), tmp_path / "out", progress=False)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 100  # reading the record would have taken 300 MiB
    assert everything_under(tmp_path) == ["long.tar.gz"]


def test_a_damaged_header_after_the_first_entry_is_an_error_not_a_short_dataset(tmp_path):
    archive = tmp_path / "cut.tar"
    with tarfile.open(archive, "w") as tf:
        for name in ("data/a.txt", "data/b.txt"):
            m = tarfile.TarInfo(name)
            m.size = 2
            tf.addfile(m, io.BytesIO(b"ok"))
    raw = bytearray(archive.read_bytes())
    raw[1024 + 148 : 1024 + 156] = b"garbage!"  # the second header's checksum field
    archive.write_bytes(bytes(raw))
    with pytest.raises(SpadeError, match="damaged after entry 'data/a.txt'"):
        fetch_dataset(str(archive), tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    "case, entries",
    [
        ("nul-in-link", [("data/l", "a\x00b")]),
        ("unknown-method", "method"),
        ("corrupt-deflate", "deflate"),
    ],
)
def test_damaged_zips_give_one_clear_error(tmp_path, case, entries):
    archive = tmp_path / "bad.zip"
    if isinstance(entries, list):
        zip_with_links(archive, ("data/ok.txt", None), *entries)
    else:
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("data/ok.txt", "ok" * 1000)
        raw = bytearray(archive.read_bytes())
        if entries == "method":  # compression method 99 in the local and central headers
            for start in (0, raw.index(b"PK\x01\x02")):
                offset = 8 if start == 0 else 10
                raw[start + offset : start + offset + 2] = (99).to_bytes(2, "little")
        else:
            raw[40:48] = b"\xff" * 8  # inside the deflate stream
        archive.write_bytes(bytes(raw))
    with pytest.raises(SpadeError, match=f"{archive}: (refused entry|cannot extract)"):
        fetch_dataset(str(archive), tmp_path / "out", progress=False)


def test_a_chain_of_links_built_to_take_exponential_time_is_refused_at_once(tmp_path):
    """Each link names the one before it four times: resolving without one budget per lookup takes 4^n."""
    import time

    entries = [("data/d/f.txt", None), ("data/l0", "d")]
    for k in range(1, 24):
        entries.append((f"data/l{k}", "/../".join([f"l{k - 1}"] * 4)))
    archive = zip_with_links(tmp_path / "chain.zip", *entries)
    start = time.monotonic()
    with pytest.raises(SpadeError, match="or a chain of more than 40 links"):
        fetch_dataset(str(archive), tmp_path / "out", progress=False)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("chain", ["up-through-a-link", "two-hops", "link-made-later"])
def test_escaping_links_alone_are_refused_by_the_plan_before_anything_exists(tmp_path, kind, chain):
    """The same chains without a file below them: nothing passes through a link, so only resolving the
    links through the archive's own tree tells that they lead out."""
    links = [(name, target) for name, target in CHAINS[chain] if target is not None]
    make = zip_with_links if kind == "zip" else tar_with_links
    archive = make(tmp_path / f"links.{kind}", ("ds/ok.txt", None), *links)
    with pytest.raises(SpadeError, match=r"refused entry .*: a link to .* outside it"):
        fetch_mod._extract(archive, tmp_path / "tree", str(archive))
    assert not any(p.is_symlink() for p in (tmp_path / "tree").rglob("*"))  # refused before any was made


def test_sizes_and_limits_must_be_finite():
    for text in ("inf", "nan", "1e400", "0.1", "-5", "0"):
        with pytest.raises(SpadeError, match="not a size"):
            fetch_mod.parse_size(text)
    with pytest.raises(SpadeError, match="positive finite"):
        ExtractLimits(max_ratio=float("inf"))
