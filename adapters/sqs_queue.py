"""The aws backend's queue: a standard SQS queue whose messages carry a job id, with
the job's tenant as message group id (SQS fair queues; README: fair scheduling).

The sending side is the :class:`~pipeline.ports.Queue` port. The receiving side
(``receive``, ``delete``, ``change_visibility``) is what ``jobq worker`` uses to
play the part Lambda's event source mapping plays in production.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.model import JSON, StoreUnavailable
from pipeline.ports import Queue

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

T = TypeVar("T")

COUNT_ATTRIBUTES = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
)


def queue_name(queue: str) -> str:
    """``name`` or a queue URL / ``host/account/name`` -> ``name``."""
    return queue.rstrip("/").rsplit("/", 1)[-1]


class SqsQueue(Queue):
    """``Queue`` on SQS. ``queue`` is the queue's name (``sqs://<name>``)."""

    name = "aws"

    def __init__(
        self, queue: str, endpoint_url: str | None = None, region: str = "us-east-1"
    ) -> None:
        self.queue_name = queue_name(queue)
        self._client: SQSClient = boto3.client(
            "sqs",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(
                connect_timeout=2,
                # A long poll holds the connection for up to 20 s.
                read_timeout=25,
                retries={"mode": "standard", "max_attempts": 3},
            ),
        )
        self._ping_client: SQSClient = boto3.client(
            "sqs",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(connect_timeout=1, read_timeout=1, retries={"max_attempts": 1}),
        )
        self._url: str | None = None
        # Own threads: long polls hold one each and must not starve other blocking work.
        self._executor = ThreadPoolExecutor(max_workers=24, thread_name_prefix="jobq-sqs")
        self._arn: str | None = None
        self._dlq_url: str | None = None

    async def _call(self, fn: Callable[..., T], **kwargs: Any) -> T:
        def run() -> T:
            return fn(**kwargs)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, run)
        except (BotoCoreError, ClientError) as exc:
            raise StoreUnavailable(f"sqs {self.queue_name}: {exc}") from exc

    async def url(self) -> str:
        """The queue URL, resolved by name once."""
        if self._url is None:
            reply = await self._call(self._client.get_queue_url, QueueName=self.queue_name)
            self._url = reply["QueueUrl"]
        return self._url

    async def arn(self) -> str:
        """The queue ARN (the ``eventSourceARN`` of the SQS events Lambda receives)."""
        if self._arn is None:
            reply = await self._call(
                self._client.get_queue_attributes,
                QueueUrl=await self.url(),
                AttributeNames=["QueueArn"],
            )
            self._arn = reply.get("Attributes", {}).get("QueueArn", self.queue_name)
        return self._arn

    async def visibility_timeout(self) -> int:
        """The queue's default visibility timeout in seconds."""
        reply = await self._call(
            self._client.get_queue_attributes,
            QueueUrl=await self.url(),
            AttributeNames=["VisibilityTimeout"],
        )
        return int(reply.get("Attributes", {}).get("VisibilityTimeout", "30"))

    async def close(self) -> None:
        self._client.close()
        self._ping_client.close()
        self._executor.shutdown(wait=False)

    async def ping(self) -> None:
        def check() -> str:
            url = self._url or self._ping_client.get_queue_url(QueueName=self.queue_name)[
                "QueueUrl"
            ]
            self._ping_client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
            return url

        try:
            self._url = await asyncio.get_running_loop().run_in_executor(self._executor, check)
        except (BotoCoreError, ClientError) as exc:
            raise StoreUnavailable(f"sqs {self.queue_name} does not answer: {exc}") from exc

    async def _enqueue(self, job_id: str, timeout_s: float, tenant: str) -> None:
        await self._call(
            self._client.send_message,
            QueueUrl=await self.url(),
            MessageBody=json.dumps({"job_id": job_id}),
            # The tenant as message group: on a standard queue that makes it an SQS
            # fair queue, which serves quiet tenants first while one has a backlog.
            MessageGroupId=tenant,
        )

    async def _counts(self, url: str) -> dict[str, int]:
        reply = await self._call(
            self._client.get_queue_attributes,
            QueueUrl=url,
            AttributeNames=[*COUNT_ATTRIBUTES, "RedrivePolicy"],
        )
        attrs: dict[str, str] = {str(k): v for k, v in reply.get("Attributes", {}).items()}
        if url == self._url and self._dlq_url is None and "RedrivePolicy" in attrs:
            target = json.loads(attrs["RedrivePolicy"]).get("deadLetterTargetArn", "")
            if target:
                dlq = await self._call(
                    self._client.get_queue_url, QueueName=target.rsplit(":", 1)[-1]
                )
                self._dlq_url = dlq["QueueUrl"]
        return {name: int(attrs.get(name, 0)) for name in COUNT_ATTRIBUTES}

    async def stats(self) -> JSON:
        """Queue depths. Workers are Lambda instances SQS scales with the queue, so
        ``workers`` is ``None``; ``in_flight`` counts deliveries being worked on."""
        counts = await self._counts(await self.url())
        dead = None
        if self._dlq_url is not None:
            dead = (await self._counts(self._dlq_url))["ApproximateNumberOfMessages"]
        return {
            "workers": None,
            "worker_kind": "lambda",
            "queued": counts["ApproximateNumberOfMessages"],
            "in_flight": counts["ApproximateNumberOfMessagesNotVisible"],
            "delayed": counts["ApproximateNumberOfMessagesDelayed"],
            "dead_letter": dead,
        }

    # -- receiving side (jobq worker) ---------------------------------------

    async def receive(
        self, max_messages: int = 1, wait_s: int = 20, visibility_timeout: int | None = None
    ) -> list[JSON]:
        """Long-poll up to ``max_messages`` messages, with their ``ApproximateReceiveCount``."""
        kwargs: dict[str, Any] = {
            "QueueUrl": await self.url(),
            "MaxNumberOfMessages": max(1, min(max_messages, 10)),
            "WaitTimeSeconds": max(0, min(wait_s, 20)),
            "MessageSystemAttributeNames": ["All"],
        }
        if visibility_timeout is not None:
            kwargs["VisibilityTimeout"] = visibility_timeout
        reply = await self._call(self._client.receive_message, **kwargs)
        return [dict(message) for message in reply.get("Messages", [])]

    async def delete(self, receipt_handle: str) -> None:
        await self._call(
            self._client.delete_message, QueueUrl=await self.url(), ReceiptHandle=receipt_handle
        )

    async def change_visibility(self, receipt_handle: str, timeout_s: int) -> None:
        """Hide a received message for ``timeout_s`` more seconds (0: redeliver now)."""
        await self._call(
            self._client.change_message_visibility,
            QueueUrl=await self.url(),
            ReceiptHandle=receipt_handle,
            VisibilityTimeout=timeout_s,
        )
