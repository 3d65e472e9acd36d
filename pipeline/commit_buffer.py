"""The write-behind buffer of one delivery: its store writes, batched and in order.

Events, artifacts, cache entries and trace records wait here and go out with the
next :meth:`JobStore.commit`, which also stores the job's ``steps`` and ``progress``
as they are then, in one round trip. Commits of a job go out one at a time, in the
order they were buffered, so a later step's checkpoint never lands before an
earlier one; a commit that carried artifacts and failed ends the delivery's writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from pipeline.model import JSON, Artifact
from pipeline.ports import JobStore
from pipeline.vocabulary import EventType, JobStatus

log = structlog.get_logger(__name__)

START_MARK_DELAY_S = 0.5
"""How long a step's "running" mark (its ``status`` event and steps state) may wait
in the buffer for the write that ends the step. Steps faster than this cost one
store round trip instead of two; a slower one shows as running after this."""
INTERRUPTED_FLUSH_S = 2.0
"""On worker shutdown, the longest a delivery tries to store what it buffered."""

STATUS_AT_COMMIT: tuple[str, JSON] = (EventType.STATUS, {})
"""A buffered ``status`` event, made when its commit goes out: a commit keeps only its
last status (:func:`last_status_only`), and the state then is the state the last one
was buffered for, since every change of steps or progress buffers one."""


class Stopped(Exception):
    """A conditional job write found another status, or another delivery's attempt:
    someone else owns the job now."""


class CommitBuffer:
    """Buffered writes of one delivery of ``job_id`` (whose attempt is ``attempts``).

    ``state`` gives the job fields every commit stores (steps and progress as they
    are at the commit); ``status`` the ``status`` event of the job as it is then.
    """

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        attempts: int,
        state: Callable[[], JSON],
        status: Callable[[], tuple[str, JSON]],
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.attempts = attempts
        self._state = state
        self._status = status
        self._lock = asyncio.Lock()
        self._events: list[tuple[str, JSON]] = []
        self._artifacts: list[Artifact] = []
        self._cache: list[tuple[str, Artifact]] = []
        self._traces: list[JSON] = []
        self._buffered = 0
        """Generation of the last write buffered; ``_written`` of the last one stored."""
        self._written = 0
        self._unwritten_since: float | None = None
        self._timer: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[Any] | None = None
        """The last commit if its flush did not see it end (cut off, or written behind)."""
        self.stopped = False
        self._lost: BaseException | None = None
        """Why a commit that carried artifacts failed: no later commit may land."""
        self._writes: set[asyncio.Task[None]] = set()
        self.failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Fails with the error of a write-behind commit; the delivery ends with it."""

    def pending_traces(self) -> list[JSON]:
        """Trace records buffered and not yet stored."""
        return list(self._traces)

    def start(self, first_write: Any) -> None:
        """Take the delivery's first write (an awaitable of whether it held), made
        outside the buffer: every later commit waits for it and takes in its outcome."""
        self._inflight = asyncio.ensure_future(first_write)

    def buffer(
        self,
        events: Iterable[tuple[str, JSON]] = (),
        artifacts: Iterable[Artifact] = (),
        cache: Iterable[tuple[str, Artifact]] = (),
        traces: Iterable[JSON] = (),
    ) -> int:
        """Queue writes for the next commit; returns their generation for :meth:`flush`."""
        self._events.extend(events)
        self._artifacts.extend(artifacts)
        self._cache.extend(cache)
        self._traces.extend(traces)
        self._buffered += 1
        if self._unwritten_since is None:
            self._unwritten_since = time.monotonic()
        return self._buffered

    async def flush(
        self,
        upto: int | None = None,
        *,
        changes: JSON | None = None,
        events: list[tuple[str, JSON]] | None = None,
        behind: bool = False,
    ) -> None:
        """Commit everything buffered, unless a commit since generation ``upto`` was
        buffered already carried it. ``changes`` and ``events`` (the job's last
        write) go with it, after what was buffered. Raises :class:`Stopped` when
        the job is no longer ``running`` (cancelled, failed or finished by someone
        else).

        ``behind``: the caller is a write-behind task, which is cancelled only once
        the delivery has nothing more to write, so its commit needs no task of its
        own to outlive it (one task less per step)."""
        target = self._buffered if upto is None else upto
        async with self._lock:
            await self._settle_cut_off_commit()
            if self.stopped:
                raise Stopped
            if self._written >= target and changes is None:
                return
            if self._lost is not None:
                raise self._lost
            generation = self._buffered
            buffered, self._events = self._events, []
            artifacts, self._artifacts = self._artifacts, []
            cache, self._cache = self._cache, []
            traces, self._traces = self._traces, []
            self._unwritten_since = None
            writing = self.store.commit(
                self.job_id,
                expect={JobStatus.RUNNING},
                expect_attempts=self.attempts,
                changes={**self._state(), **(changes or {})},
                events=self._materialized(last_status_only([*buffered, *(events or ())])),
                artifacts=artifacts,
                cache=cache,
                traces=traces,
            )
            try:
                if behind:
                    held: object = await writing
                else:
                    # A flush cancelled mid-write (deadline, cancel, shutdown) leaves its
                    # commit to finish whole; the next flush waits for it (event order).
                    commit = self._inflight = asyncio.ensure_future(writing)
                    held = await _outcome(commit)
            except Exception as exc:  # not CancelledError: a cut-off commit is settled later
                self._inflight = None
                self._commit_failed(exc, bool(artifacts))
                raise
            self._inflight = None
            if not held:
                self.stopped = True
                raise Stopped
            self._written = generation

    def write_behind(self, generation: int) -> None:
        """Flush up to ``generation`` in a task of its own; nothing waits for it. A
        failure fails :attr:`failed`."""
        task = asyncio.create_task(self._write_behind(generation))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def flush_soon(self) -> None:
        """Make sure what is buffered is written within ``START_MARK_DELAY_S``."""
        if self._timer is None or self._timer.done():
            self._timer = asyncio.create_task(self._flush_when_due(), name=f"job:{self.job_id}:flush")

    async def flush_interrupted(self, changes: JSON | None) -> None:
        """Store what is buffered (start marks, traces of finished calls) with
        ``changes``, if that is quick; the next delivery resumes either way."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(INTERRUPTED_FLUSH_S):
                await self.flush(changes=changes)

    async def close(self) -> None:
        """End the buffer's own tasks. Each final write (completion, failure, shutdown
        flush) went after them under the lock; what is left has nothing to write."""
        if self.failed.done() and not self.failed.cancelled():
            self.failed.exception()  # read: the delivery may have ended another way first
        self.failed.cancel()
        await stop_tasks(*self._writes, *([self._timer] if self._timer else []))

    # -- internals --------------------------------------------------------

    def _materialized(self, events: list[tuple[str, JSON]]) -> list[tuple[str, JSON]]:
        """``events`` with the status placeholder made into the job's status now."""
        return [self._status() if event is STATUS_AT_COMMIT else event for event in events]

    async def _settle_cut_off_commit(self) -> None:
        """Wait for a commit no flush saw end, and take in its outcome."""
        commit, self._inflight = self._inflight, None
        if commit is None:
            return
        await asyncio.wait({commit})
        if commit.cancelled():
            return
        exc = commit.exception()
        if exc is not None:
            log.warning("job_commit_failed", job_id=self.job_id, error=str(exc))
            # What it carried is not known here (a step's end, or the "running" mark
            # the run began with): treat it as a checkpoint.
            self._commit_failed(exc, carried_artifacts=True)
        elif not commit.result():
            self.stopped = True

    def _commit_failed(self, exc: BaseException, carried_artifacts: bool) -> None:
        """A lost commit that carried artifacts ends the delivery's writes: a later
        step's checkpoint must never land without the ones before it. (A lost commit
        of start marks and traces only loses status snapshots the next commit
        repeats.) The next delivery resumes from what did land."""
        if carried_artifacts and self._lost is None:
            self._lost = exc

    async def _write_behind(self, generation: int) -> None:
        try:
            await self.flush(generation, behind=True)
        except Exception as exc:  # handed to the delivery, which ends with it
            if not self.failed.done():
                self.failed.set_exception(exc)

    async def _flush_when_due(self) -> None:
        while self._unwritten_since is not None:
            due = self._unwritten_since + START_MARK_DELAY_S - time.monotonic()
            if due > 0:
                await asyncio.sleep(due)
                continue
            try:
                await self.flush()
            except Stopped:
                return  # the next step's write raises it in the step
            except Exception as exc:  # logged; the next write of the job retries
                log.warning("job_flush_failed", job_id=self.job_id, error=str(exc))
                return


def last_status_only(events: list[tuple[str, JSON]]) -> list[tuple[str, JSON]]:
    """A commit's events without its ``status`` events but the last. Each status is a
    full snapshot of the job and a commit's events reach every reader together, so the
    last says all that the earlier ones did (a step started and the artifact of another
    in one commit: one status with both)."""
    kept: list[tuple[str, JSON]] = []
    seen_status = False
    for event in reversed(events):
        if event[0] == EventType.STATUS:
            if seen_status:
                continue
            seen_status = True
        kept.append(event)
    kept.reverse()
    return kept


async def stop_tasks(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait until they have unwound (in-flight calls aborted)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _outcome(task: asyncio.Future[Any]) -> Any:
    """``task``'s result; cancelling the caller does not cancel ``task``: what
    ``asyncio.shield`` does, with one future and one callback instead of two each."""
    if not task.done():
        waiter = asyncio.get_running_loop().create_future()
        wake = functools.partial(_wake, waiter)
        task.add_done_callback(wake)
        try:
            await waiter
        except asyncio.CancelledError:
            task.remove_done_callback(wake)
            raise
    return task.result()


def _wake(waiter: asyncio.Future[None], _: object) -> None:
    if not waiter.done():
        waiter.set_result(None)
