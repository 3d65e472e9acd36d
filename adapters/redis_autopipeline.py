"""Automatic pipelining of Redis commands issued in the same event-loop turn."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from adapters.redis_clients import OP_TIMEOUT_S

AUTO_PIPELINES_IN_FLIGHT = 2
"""Auto-pipelines out at once per client (see ``AutoPipeline``)."""


class AutoPipeline:
    """Commands issued in the same event-loop turn, by any task, go to Redis as one
    pipeline (one connection checkout, one write, one read of all replies), so a
    worker running many jobs pays the client's per-command overhead once per turn
    instead of once per command. Each command keeps its own reply or error; none is
    atomic with another (each commit is one atomic script already).

    At most ``max_in_flight`` pipelines are out at once: commands issued meanwhile
    wait for one to return and go together, so under load the batches grow instead of
    the number of connection checkouts and round trips."""

    def __init__(self, client: aioredis.Redis, max_in_flight: int = AUTO_PIPELINES_IN_FLIGHT) -> None:
        self.client = client
        self.max_in_flight = max_in_flight
        self.pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self.sending: set[asyncio.Task[None]] = set()
        self.scheduled = False

    def submit(self, *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        self.pending.append((args, reply))
        if not self.scheduled and len(self.sending) < self.max_in_flight:
            self.scheduled = True
            loop.call_soon(self._send_pending)
        return reply

    def _send_pending(self) -> None:
        self.scheduled = False
        batch = [(args, reply) for args, reply in self.pending if not reply.done()]
        self.pending = []
        if batch:
            task = asyncio.ensure_future(self._send(batch))
            self.sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self.sending.discard(task)
        if self.pending and not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._send_pending)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                async with self.client.pipeline(transaction=False) as pipe:
                    for args, _ in batch:
                        pipe.execute_command(*args)
                    replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # every caller sees it (as StoreUnavailable via _op)
            for _, reply in batch:
                if not reply.done():
                    reply.set_exception(exc)
            return
        for (_, reply), value in zip(batch, replies, strict=True):
            if reply.done():
                continue  # its caller gave up (cancelled); the command ran anyway
            if isinstance(value, Exception):
                reply.set_exception(value)
            else:
                reply.set_result(value)

    async def eval(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """``script`` by EVALSHA in a batch; loaded again if Redis forgot it (a restart)."""
        try:
            return await self.submit("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            async with asyncio.timeout(OP_TIMEOUT_S):
                return await script(keys=keys, args=args)
