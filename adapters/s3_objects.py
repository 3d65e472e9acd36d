"""The aws store's access to its bucket: boto3 calls in threads, JSON objects, listings,
conditional writes, and which S3 errors mean what (see :mod:`adapters.s3_store`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.model import StoreUnavailable

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

T = TypeVar("T")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def lost_race(exc: ClientError) -> bool:
    """412: the precondition failed; 409: another conditional write was in flight."""
    return _http_status(exc) in (409, 412) or _code(exc) in (
        "PreconditionFailed",
        "ConditionalRequestConflict",
    )


def missing(exc: ClientError) -> bool:
    return _http_status(exc) == 404 or _code(exc) in ("NoSuchKey", "404", "NotFound")


class S3Objects:
    """JSON objects under ``prefix/`` in one bucket, read and written from asyncio."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None, region: str) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self._client: S3Client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(
                connect_timeout=2,
                read_timeout=10,
                retries={"mode": "standard", "max_attempts": 3},
                max_pool_connections=32,
            ),
        )
        self._ping_client: S3Client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(connect_timeout=1, read_timeout=1, retries={"max_attempts": 1}),
        )
        # Own threads: boto3 blocks, and a shared default executor can be starved by
        # other blocking work (SQS long polls) in the same process.
        self._executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="jobq-s3")

    def key(self, *parts: str) -> str:
        """``prefix/part/...``; a trailing ``""`` part makes a listing prefix ending in ``/``."""
        return "/".join((self.prefix, *parts) if self.prefix else parts)

    async def call(self, fn: Callable[..., T], **kwargs: Any) -> T:
        """Run one boto3 call in a thread; transport errors and 5xx become
        :class:`StoreUnavailable`, other client errors propagate."""

        def run() -> T:
            return fn(**kwargs)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, run)
        except ClientError as exc:
            if _http_status(exc) >= 500 or _code(exc) in ("NoSuchBucket", "AccessDenied"):
                raise StoreUnavailable(f"s3: {_code(exc)}: {exc}") from exc
            raise
        except BotoCoreError as exc:
            raise StoreUnavailable(f"s3: {exc}") from exc

    async def get_json(self, key: str) -> tuple[Any, str] | None:
        """The decoded object and its ETag, or ``None`` when it does not exist."""

        def fetch(Key: str) -> tuple[bytes, str]:
            obj = self._client.get_object(Bucket=self.bucket, Key=Key)
            return obj["Body"].read(), obj["ETag"]

        try:
            body, etag = await self.call(fetch, Key=key)
        except ClientError as exc:
            if missing(exc):
                return None
            raise
        return json.loads(body), etag

    async def put(self, key: str, value: Any, **conditions: str) -> str:
        """Write ``value`` as JSON; returns the new ETag. ``IfMatch`` / ``IfNoneMatch``
        pass through, so a lost race raises ``ClientError`` (see :func:`lost_race`)."""
        body = json.dumps(value, separators=(",", ":")).encode() if value is not None else b""
        reply = await self.call(
            self._client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=body,
            ContentType="application/json",
            **conditions,
        )
        return reply["ETag"]

    async def exists(self, key: str) -> bool:
        try:
            await self.call(self._client.head_object, Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if missing(exc):
                return False
            raise
        return True

    async def list_keys(
        self, prefix: str, start_after: str | None = None, limit: int | None = None
    ) -> list[str]:
        """Keys under ``prefix`` in ascending order, paging as needed."""
        keys: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            elif start_after:
                kwargs["StartAfter"] = start_after
            if limit is not None:
                kwargs["MaxKeys"] = min(1000, limit - len(keys))
            page = await self.call(self._client.list_objects_v2, **kwargs)
            keys += [item["Key"] for item in page.get("Contents", []) if "Key" in item]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token or (limit and len(keys) >= limit):
                return keys

    async def delete(self, key: str) -> None:
        await self.call(self._client.delete_object, Bucket=self.bucket, Key=key)

    async def delete_keys(self, keys: Iterable[str]) -> None:
        batch = list(keys)
        for start in range(0, len(batch), 1000):
            chunk = batch[start : start + 1000]
            await self.call(
                self._client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True},
            )

    async def get_many(self, keys: list[str]) -> list[Any]:
        """Bodies of ``keys`` in the same order; objects deleted meanwhile are skipped."""
        found = await asyncio.gather(*(self.get_json(k) for k in keys))
        return [item[0] for item in found if item is not None]

    async def ping(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: self._ping_client.head_bucket(Bucket=self.bucket)
            )
        except (BotoCoreError, ClientError) as exc:
            raise StoreUnavailable(f"s3: bucket {self.bucket} does not answer: {exc}") from exc

    def close(self) -> None:
        self._client.close()
        self._ping_client.close()
        self._executor.shutdown(wait=False)
