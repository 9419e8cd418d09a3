"""Bulk bytes of the store (uploaded inputs, parameter sets, built packages), kept apart from the metadata.

Two back ends: a local directory (the embedded default, beside SQLite) and an S3-compatible object store
(boto3; AWS, MinIO, Ceph, ... — tests use moto's server), which several cloud replicas can share. Keys are
relative paths such as ``inputs/20260101/<uuid>.npy``; a blob is written before any row names it, so a crash
leaves at most an unreferenced blob, never a row pointing at nothing.
"""

from __future__ import annotations

import io
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from edgeadapt.cloud.store.records import NotFound, StoreError, StoreUnavailable
from edgeadapt.core.fileperm import private_dir


def check_key(key: str) -> str:
    """Refuse keys that could leave the store's root (absolute, ``..``)."""
    if not key or key.startswith("/") or ".." in key.split("/"):
        raise StoreError(f"illegal blob key {key!r}")
    return key


class BlobStore(ABC):
    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def close(self) -> None:  # noqa: B027 - most back ends hold nothing to release
        pass


class LocalBlobStore(BlobStore):
    """A directory (0700); each write goes to a temporary file renamed into place, so a reader never sees half."""

    def __init__(self, root: str | Path):
        try:
            self.root = private_dir(root)
        except OSError:  # broken (e.g. a file in its place): reads of the metadata (`cloud devices`) still work,
            self.root = Path(root)  # blob writes fail, and the cloud's health says why

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"blob {key} not found") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3BlobStore(BlobStore):
    """Objects under ``s3://bucket/prefix`` (``endpoint_url`` for a non-AWS server). Credentials and region come
    from boto3's usual chain (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, profiles).
    The bucket is created when it does not exist yet. Failures to reach the server raise ``StoreUnavailable``
    (503 to devices, which keep their queue)."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
                 create_bucket: bool = True):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"}))
        if create_bucket:
            self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        with self._errors("bucket " + self.bucket):
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                try:
                    self._client.create_bucket(Bucket=self.bucket)
                except ClientError as exc2:  # another replica created it first
                    if exc2.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou",
                                                                           "BucketAlreadyExists"):
                        raise

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    class _errors:
        """Translate botocore failures: a missing object is ``NotFound``, anything else ``StoreUnavailable``."""

        def __init__(self, what: str):
            self.what = what

        def __enter__(self):
            return self

        def __exit__(self, et, ev, tb):
            if ev is None or isinstance(ev, StoreError):
                return False
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(ev, ClientError):
                code = ev.response.get("Error", {}).get("Code")
                if code in ("NoSuchKey", "404", "NotFound"):
                    raise NotFound(f"blob {self.what} not found") from ev
                raise StoreUnavailable(f"object store: {self.what}: {code}: {ev}") from ev
            if isinstance(ev, BotoCoreError):
                raise StoreUnavailable(f"object store: {self.what}: {ev}") from ev
            return False

    def put(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get(self, key: str) -> bytes:
        with self._errors(key):
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            with self._errors(key):
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except NotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        with self._errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def close(self) -> None:
        self._client.close()


def open_blob_store(url: str, endpoint_url: str | None = None, region: str | None = None,
                    create_bucket: bool = True) -> BlobStore:
    """``s3://bucket/prefix`` -> an S3 store; ``file:///dir`` or a plain path -> a local directory."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"blob URL {url!r} names no bucket (s3://BUCKET/PREFIX)")
        return S3BlobStore(parsed.netloc, parsed.path, endpoint_url=endpoint_url, region=region,
                           create_bucket=create_bucket)
    if parsed.scheme == "file":
        return LocalBlobStore(Path(parsed.path))
    if parsed.scheme == "":
        return LocalBlobStore(Path(url).expanduser())
    raise StoreError(f"blob URL {url!r}: use s3://BUCKET/PREFIX or a directory")


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
