"""Local folders and s3:// prefixes behind one small interface.

S3 goes through boto3; an S3-compatible store (MinIO, moto, ...) is reached by
setting `AWS_ENDPOINT_URL` (or `S3_ENDPOINT_URL`) in the environment.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from spade.errors import SpadeError


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise SpadeError(f"{uri}: an s3 URI needs a bucket, like s3://bucket/prefix")
    return bucket, key.strip("/")


def s3_client():  # noqa: ANN201 - boto3 client type is dynamic
    try:
        import boto3
    except ImportError:  # pragma: no cover - boto3 is a dependency
        raise SpadeError("s3:// locations need boto3: pip install boto3") from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=endpoint)


class Store:
    """A folder (local path or s3://bucket/prefix) holding named files."""

    def __init__(self, location: str | Path) -> None:
        self.location = str(location).rstrip("/")
        self.s3 = is_s3(self.location)
        if self.s3:
            self.bucket, self.prefix = split_s3(self.location)
            self._client = None
        else:
            self.path = Path(self.location)

    @property
    def client(self):  # noqa: ANN201
        if self._client is None:
            self._client = s3_client()
        return self._client

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def uri(self, name: str) -> str:
        return f"{self.location}/{name}"

    def list(self) -> list[str]:
        """Names of the files directly in this folder (empty when it does not exist)."""
        if not self.s3:
            if not self.path.is_dir():
                return []
            return sorted(p.name for p in self.path.iterdir() if p.is_file() and not p.name.startswith("."))
        names = []
        prefix = self._key("")
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix) :]
                    if name and "/" not in name:
                        names.append(name)
        except Exception as exc:
            raise SpadeError(f"cannot list {self.location}: {exc}") from None
        return sorted(names)

    def put(self, local: str | Path, name: str) -> str:
        """Copy a local file in (atomically for folders; S3 uploads are atomic per object)."""
        if not self.s3:
            self.path.mkdir(parents=True, exist_ok=True)
            target = self.path / name
            if Path(local).resolve() != target.resolve():
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.path)
                os.close(fd)
                try:
                    shutil.copyfile(local, tmp)
                    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide it from other users (a server)
                    os.replace(tmp, target)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            return str(target)
        try:
            self.client.upload_file(str(local), self.bucket, self._key(name))
        except Exception as exc:
            raise SpadeError(f"cannot upload {local} to {self.uri(name)}: {exc}") from None
        return self.uri(name)

    def get(self, name: str, local: str | Path) -> Path:
        """A local copy of a file of this folder."""
        local = Path(local)
        if not self.s3:
            source = self.path / name
            if not source.is_file():
                raise SpadeError(f"not found: {source}")
            if source.resolve() != local.resolve():
                shutil.copyfile(source, local)
            return local
        try:
            self.client.download_file(self.bucket, self._key(name), str(local))
        except Exception as exc:
            raise SpadeError(f"cannot download {self.uri(name)}: {exc}") from None
        return local

    def delete(self, name: str) -> None:
        if not self.s3:
            (self.path / name).unlink(missing_ok=True)
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as exc:
            raise SpadeError(f"cannot delete {self.uri(name)}: {exc}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def local_file(location: str | Path, folder: Path, what: str) -> Path:
    """A local path for a local path (as it is: its reader says what is wrong with it) or an s3:// URI of a
    file (downloaded into `folder`)."""
    if not is_s3(location):
        return Path(location)
    bucket, key = split_s3(str(location))
    parent, _, name = key.rpartition("/")
    if not name:
        raise SpadeError(f"{what} {location} names a bucket, not a file")
    return Store(f"s3://{bucket}/{parent}" if parent else f"s3://{bucket}").get(name, folder / name)
