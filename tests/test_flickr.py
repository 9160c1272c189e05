"""spade.data.flickr against a fake Flickr REST API on 127.0.0.1: paging, the count cap, licences,
de-duplication, resume after an interruption, API errors, throttling and the attribution manifest."""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from http.server import BaseHTTPRequestHandler
from pathlib import PurePosixPath

import pytest

from http_helpers import FakeServer, reply
from spade.data import flickr
from spade.data.fetch import fetch_dataset
from spade.data.flickr import FlickrQuery, RateLimiter, fetch_flickr, read_manifest
from spade.errors import SpadeError

KEY = "test-key"


class FakeFlickr(FakeServer):
    """flickr.photos.search at /services/rest/ and the photos at /img/<id>.jpg.

    `photos` are the search results in order; `content` maps ids to image bytes (default: unique bytes);
    `suffixes` maps ids to another file suffix of their URL (e.g. ".gif"); `throttle` answers that many
    next requests with 429 + Retry-After; `repeat` ids show up again on page 2.
    """

    def __init__(
        self,
        n: int = 12,
        *,
        content: dict[str, bytes] | None = None,
        repeat: tuple[str, ...] = (),
        suffixes: dict[str, str] | None = None,
    ) -> None:
        self.photos = [self.photo(str(1000 + i)) for i in range(n)]
        self.content = content or {}
        self.repeat = repeat
        self.suffixes = suffixes or {}
        self.throttle, self.retry_after, self.fail_status = 0, "7", 429
        self.api_calls: list[dict] = []
        self.downloads: list[str] = []

    @property
    def endpoint(self) -> str:
        return f"{self.base}/services/rest/"

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        if self.throttle > 0:
            self.throttle -= 1
            reply(h, self.fail_status, headers=[("Retry-After", self.retry_after)])
            return
        url = urllib.parse.urlsplit(h.path)
        if url.path == "/services/rest/":
            reply(h, 200, self.search(dict(urllib.parse.parse_qsl(url.query))))
        elif url.path.startswith("/img/"):
            pid = PurePosixPath(url.path).stem
            self.downloads.append(pid)
            reply(h, 200, self.content.get(pid, f"JPEG bytes of photo {pid}".encode()))
        else:
            reply(h, 404)

    def photo(self, pid: str) -> dict:
        return {
            "id": pid,
            "owner": f"{pid}@N0{int(pid) % 3}",
            "secret": "abc",
            "server": "65535",
            "title": f"Lake {pid}",
            "license": "4" if int(pid) % 2 else "9",
            "ownername": f"Photographer {pid}",
            "o_width": "4000",
            "o_height": "3000",
            "width_z": "640",
            "height_z": "480",
        }

    def search(self, params: dict) -> dict:
        self.api_calls.append(params)
        if params.get("api_key") != KEY:
            return {"stat": "fail", "code": 100, "message": "Invalid API Key (Key has invalid format)"}
        page, per_page = int(params.get("page", 1)), int(params.get("per_page", 100))
        size = params["extras"].split("url_")[1].split(",")[0]
        chosen = self.photos[(page - 1) * per_page : page * per_page]
        if page == 2:
            chosen = [p for p in self.photos if p["id"] in self.repeat] + chosen
        photos = [
            {**p, f"url_{size}": f"{self.base}/img/{p['id']}{self.suffixes.get(p['id'], '.jpg')}"} for p in chosen
        ]
        pages = -(-len(self.photos) // per_page)
        return {
            "photos": {"page": page, "pages": pages, "perpage": per_page, "total": len(self.photos), "photo": photos},
            "stat": "ok",
        }


@pytest.fixture(autouse=True)
def _no_waiting(monkeypatch):
    """Waits are recorded, not slept."""
    waits: list[float] = []
    monkeypatch.setattr(flickr, "_sleep", waits.append)
    monkeypatch.delenv("FLICKR_API_KEY", raising=False)
    return waits


def run(server: FakeFlickr, out, query: FlickrQuery, **kwargs):  # noqa: ANN001, ANN201
    return fetch_flickr(query, out, api_key=KEY, endpoint=server.endpoint, rate=0, progress=False, **kwargs)


def test_paging_count_cap_licences_and_attribution(tmp_path):
    with FakeFlickr(12) as server:
        report = run(server, tmp_path, FlickrQuery(text="mountain lake", tags="landscape", count=8, per_page=5))
    assert report.downloaded == 8 and report.pages == 2 and report.kept == 8
    assert [c["page"] for c in server.api_calls] == ["1", "2"]
    call = server.api_calls[0]
    assert call["method"] == "flickr.photos.search" and call["license"] == "1,2,3,4,5,6,9,10"
    assert call["text"] == "mountain lake" and call["tags"] == "landscape" and call["per_page"] == "5"
    assert call["extras"] == "license,owner_name,url_z,o_dims"
    assert (call["format"], call["nojsoncallback"], call["content_type"], call["media"]) == ("json", "1", "1", "photos")
    assert server.downloads == [str(1000 + i) for i in range(8)]

    records = read_manifest(tmp_path / "manifest.jsonl")
    assert len(records) == 8 and sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        f"{1000 + i}.jpg" for i in range(8)
    ]
    first, second = records[0], records[1]
    assert first["id"] == "1000" and first["owner"] == "1000@N01" and first["owner_name"] == "Photographer 1000"
    assert (first["license"], first["license_name"]) == ("9", "CC0 1.0")
    assert first["license_url"] == "https://creativecommons.org/publicdomain/zero/1.0/"
    assert (second["license"], second["license_name"]) == ("4", "CC BY 2.0")
    assert first["title"] == "Lake 1000" and first["file"] == "images/1000.jpg" and first["status"] == "ok"
    assert first["page_url"] == "https://www.flickr.com/photos/1000@N01/1000"
    assert first["sha256"] == hashlib.sha256(b"JPEG bytes of photo 1000").hexdigest()
    assert (first["width"], first["height"]) == (640, 480)
    query = json.loads((tmp_path / "flickr.json").read_text())
    assert query["text"] == "mountain lake" and "api_key" not in json.dumps(query)


def test_custom_licences_size_and_sort_are_passed(tmp_path):
    with FakeFlickr(3) as server:
        run(server, tmp_path, FlickrQuery(tags="lake", license="4, 5,9", size="b", sort="interestingness-desc"))
    call = server.api_calls[0]
    assert call["license"] == "4,5,9" and call["extras"].endswith("url_b,o_dims")
    assert call["sort"] == "interestingness-desc" and "text" not in call
    assert len(list((tmp_path / "images").iterdir())) == 3


def test_duplicates_by_id_and_by_content(tmp_path):
    content = {"1003": b"JPEG bytes of photo 1001"}  # 1003 is the same picture as 1001
    with FakeFlickr(8, content=content, repeat=("1000", "1002")) as server:
        report = run(server, tmp_path, FlickrQuery(text="lake", count=100, per_page=4))
    assert report.duplicates == 1 and report.downloaded == 7
    assert sorted(server.downloads) == sorted(str(1000 + i) for i in range(8))  # repeated ids not fetched again
    dup = [r for r in read_manifest(tmp_path / "manifest.jsonl") if r["status"] == "duplicate"]
    assert dup == [dup[0]] and dup[0]["id"] == "1003" and dup[0]["duplicate_of"] == "1001" and dup[0]["file"] is None
    assert not (tmp_path / "images" / "1003.jpg").exists()


def test_interrupted_run_resumes_without_downloading_again(tmp_path):
    class Killed(Exception):
        pass

    def kill_after_three(record: dict) -> None:
        if len(read_manifest(tmp_path / "manifest.jsonl")) == 3:
            raise Killed

    with FakeFlickr(10) as server:
        with pytest.raises(Killed):
            run(server, tmp_path, FlickrQuery(text="lake", count=7, per_page=4), on_photo=kill_after_three)
        assert server.downloads == ["1000", "1001", "1002"]
        (tmp_path / "images" / ".1003.jpg.part").write_bytes(b"half")  # a crash mid-write
        with (tmp_path / "manifest.jsonl").open("a") as fh:
            fh.write('{"id": "torn')  # and a torn last line
        report = run(server, tmp_path, FlickrQuery(text="lake", count=7, per_page=4))
    assert report.already == 3 and report.downloaded == 4 and report.kept == 7
    assert server.downloads == [str(1000 + i) for i in range(7)]
    assert [r["id"] for r in read_manifest(tmp_path / "manifest.jsonl")] == [str(1000 + i) for i in range(7)]
    assert not list((tmp_path / "images").glob(".*"))

    with FakeFlickr(10) as server:  # complete: nothing more to do, not even a search
        again = run(server, tmp_path, FlickrQuery(text="lake", count=7, per_page=4))
    assert again.already == 7 and again.downloaded == 0 and server.api_calls == []


def test_api_error_and_missing_key(tmp_path):
    error = r"Flickr API error 100: Invalid API Key.*check FLICKR_API_KEY"
    with FakeFlickr(3) as server, pytest.raises(SpadeError, match=error):
        fetch_flickr(FlickrQuery(text="x"), tmp_path, api_key="wrong", endpoint=server.endpoint, progress=False)
    with pytest.raises(SpadeError, match="set FLICKR_API_KEY"):
        fetch_flickr(FlickrQuery(text="x"), tmp_path, progress=False)


def test_throttling_is_retried_honouring_retry_after(tmp_path, _no_waiting):
    with FakeFlickr(2) as server:
        server.throttle = 2
        report = run(server, tmp_path, FlickrQuery(text="lake"))
        assert report.downloaded == 2 and _no_waiting == [7.0, 7.0]

        _no_waiting.clear()
        server.throttle, server.fail_status, server.retry_after = 100, 503, ""
        with pytest.raises(SpadeError, match="HTTP 503"):
            run(server, tmp_path / "b", FlickrQuery(text="lake"), retries=3, backoff=0.5)
        assert _no_waiting == [0.5, 1.0, 2.0]  # exponential backoff, bounded retries
        assert server.throttle == 100 - 4


def test_rate_limit_spaces_requests(_no_waiting, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(flickr.time, "monotonic", lambda: now[0])
    limiter = RateLimiter(4.0)
    for _ in range(3):
        limiter.wait()
    assert _no_waiting == [0.25, 0.5]


def test_flickr_source_through_fetch_dataset(tmp_path, monkeypatch):
    with FakeFlickr(5) as server:
        monkeypatch.setenv("FLICKR_API_KEY", KEY)
        monkeypatch.setenv("FLICKR_ENDPOINT", server.endpoint)
        monkeypatch.setenv("FLICKR_RATE", "0")
        result = fetch_dataset("flickr:?text=mountain+lake&tags=landscape&count=4&size=z", tmp_path, progress=False)
    assert result.layout == "photos" and result.needs_labels and result.path == tmp_path
    assert result.files == 6  # 4 photos, manifest.jsonl, flickr.json
    assert json.loads((tmp_path / "fetch.json").read_text())["layout"] == "photos"
    assert server.api_calls[0]["text"] == "mountain lake" and server.api_calls[0]["per_page"] == "100"


def test_query_parsing():
    q = FlickrQuery.from_source("flickr:?text=mountain+lake&tags=landscape&count=200&size=b&license=4,9")
    assert (q.text, q.tags, q.count, q.size, q.license) == ("mountain lake", "landscape", 200, "b", "4,9")
    assert FlickrQuery.from_source("flickr:?tags=sea", count=5, text=None).count == 5
    for bad, message in [
        ("flickr:?count=3", "needs text or tags"),
        ("flickr:?text=a&colour=red", "unknown Flickr query parameter 'colour'"),
        ("flickr:?text=a&size=huge", "unknown Flickr size"),
        ("flickr:?text=a&license=4,42", "unknown Flickr licence id"),
        ("flickr:?text=a&count=many", "invalid literal"),
    ]:
        with pytest.raises(SpadeError, match=message):
            FlickrQuery.from_source(bad)


def test_cli_flickr_options(tmp_path, monkeypatch, capsys):
    import argparse

    from spade.data.fetch import add_arguments, main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setenv("FLICKR_API_KEY", KEY)
    with FakeFlickr(6) as server:
        args = parser.parse_args(
            ["flickr:?tags=landscape", "--out", str(tmp_path), "--flickr-text", "mountain lake", "--count", "3",
             "--flickr-license", "4,9", "--size", "c", "--rate", "0", "--flickr-endpoint", server.endpoint,
             "--no-progress"]
        )  # fmt: skip
        assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["layout"] == "photos" and printed["needs_labels"] is True
    call = server.api_calls[0]
    assert (call["text"], call["tags"], call["license"]) == ("mountain lake", "landscape", "4,9")
    assert call["extras"] == "license,owner_name,url_c,o_dims" and len(server.downloads) == 3
    with pytest.raises(SpadeError, match="--sha256 does not apply"):
        main(parser.parse_args(["flickr:?tags=a", "--out", str(tmp_path), "--sha256", "0" * 64]))


def test_formats_nothing_reads_are_not_downloaded_but_counted(tmp_path):
    with FakeFlickr(5, suffixes={"1001": ".gif", "1003": ".png"}) as server:
        report = run(server, tmp_path, FlickrQuery(text="lake", count=100))
    assert report.downloaded == 4 and report.unsupported == 1 and "1 in an unread format" in report.summary()
    assert "1001" not in server.downloads
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["1000.jpg", "1002.jpg", "1003.png", "1004.jpg"]


def test_fetch_dataset_checks_the_flickr_options(tmp_path):
    with pytest.raises(SpadeError, match="flickr:.*--sha256 does not apply to flickr: sources"):
        fetch_dataset("flickr:?text=lake", tmp_path / "a", sha256="0" * 64, progress=False)
    with pytest.raises(SpadeError, match="gives the photos layout, not coco"):
        fetch_dataset("flickr:?text=lake", tmp_path / "a", layout="coco", progress=False)
    with pytest.raises(SpadeError, match="--flickr-text, --rate only apply to flickr: sources"):
        fetch_dataset(str(tmp_path), tmp_path / "a", flickr_text="lake", rate=2.0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_foreign_folder_is_refused_and_an_interrupted_fetch_resumed(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    (mine / "manifest.jsonl").write_text('{"stem": "a"}\n')  # e.g. a pseudo-labelled set's: not Flickr's
    with pytest.raises(SpadeError, match=r"mine is not empty and was not written by spade fetch \(no \.spade-fetch, "):
        fetch_dataset("flickr:?text=lake", mine, progress=False)
    assert sorted(p.name for p in mine.iterdir()) == ["manifest.jsonl", "notes.txt"]
    assert (mine / "notes.txt").read_text() == "precious"

    monkeypatch.setenv("FLICKR_API_KEY", KEY)
    monkeypatch.setenv("FLICKR_RATE", "0")
    with FakeFlickr(5) as server:
        monkeypatch.setenv("FLICKR_ENDPOINT", server.endpoint)
        run(server, tmp_path / "photos", FlickrQuery(text="lake", count=2))  # an earlier run, no marker yet
        result = fetch_dataset("flickr:?text=lake&count=3", tmp_path / "photos", progress=False)
    assert result.files == 5 and server.downloads == ["1000", "1001", "1002"]  # 3 photos, manifest, flickr.json
