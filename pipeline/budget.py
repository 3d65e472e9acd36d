"""Cost caps (SPEC 7.4): a job's ``max_cost_usd`` and a tenant's
``TENANT_MAX_COST_USD_PER_DAY``, at the prices of ``LLM_PRICES``.

Before each LLM call (every attempt, retry and repair) the call's worst case is
*reserved* on the job's spend counter and the tenant's counter of the UTC day:
the prompt's tokens as the context guard estimates them plus the call's
``max_tokens``, at the model's price, rounded up. A counter refuses a reservation
that would take it past its cap, atomically in the job store, so calls running in
parallel (a job's steps, a tenant's jobs on other workers) cannot both pass the
cap. After the call the reservation is *settled* to what the call's trace record
costs (0 for a failed call), so a counter is the sum of its trace records' costs
plus the worst cases of the calls still in flight (and of calls aborted from
outside, which the provider may bill in full). A call refused while the same
job has calls in flight waits for them to settle and tries again; refused with
none in flight, the step fails with ``budget_exceeded``. A step served from the
cache makes no call and costs nothing.

Counters are integers of micro-USD (millionths of a dollar), the precision of a
trace record's ``cost_usd``, so totals add up exactly on every backend.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

import structlog

from pipeline.deps import Deps, PipelineConfig
from pipeline.graph import LLM_STEPS
from pipeline.model import Job, LLMError, StoreUnavailable
from pipeline.ports import JobStore
from pipeline.request import JobRequest, RequestInvalid
from pipeline.vocabulary import ErrorCode

log = structlog.get_logger(__name__)

MICRO_USD = 1_000_000
"""Counter units per USD."""
FREE_MODELS = frozenset({"offline"})
"""Models that cost nothing without a price of their own: the offline provider's."""
JOB_COUNTER_TTL_S = 7 * 24 * 3600
"""A job's counter lives this long after its last reservation (a resumed delivery
still sees what earlier ones spent)."""
TENANT_COUNTER_TTL_S = 2 * 24 * 3600
"""A tenant's day counter outlives its UTC day by a day, then expires."""

Price = tuple[float, float]
"""USD per 1k tokens: (prompt, completion)."""


def to_micro(usd: float) -> int:
    return round(usd * MICRO_USD)


def to_usd(micro_usd: int) -> float:
    return micro_usd / MICRO_USD


def price_of(prices: Mapping[str, Price], model: str) -> Price | None:
    """The price of ``model`` from ``LLM_PRICES``; free for :data:`FREE_MODELS`."""
    price = prices.get(model)
    if price is None and model in FREE_MODELS:
        return (0.0, 0.0)
    return price


def cost_usd(config: PipelineConfig, model: str, prompt: int, completion: int) -> float | None:
    """What a call with these token counts costs at ``LLM_PRICES`` (rounded to the
    micro-USD); ``None`` without a price for ``model``."""
    price = config.price_per_1k_tokens.get(model)
    if price is None:
        return None
    return round(prompt / 1000 * price[0] + completion / 1000 * price[1], 6)


def worst_case(price: Price, prompt_tokens: int, max_output_tokens: int) -> int:
    """Micro-USD a call can cost at most: its prompt and all of its output budget,
    rounded up."""
    usd = prompt_tokens / 1000 * price[0] + max_output_tokens / 1000 * price[1]
    return math.ceil(round(usd * MICRO_USD, 6))


def unpriced(models: Iterable[str], prices: Mapping[str, Price]) -> list[str]:
    """The models of ``models`` without a price, sorted."""
    return sorted({m for m in models if price_of(prices, m) is None})


def models_in_use(config: PipelineConfig) -> set[str]:
    return {config.model_for(step) for step in LLM_STEPS}


def check_priced(config: PipelineConfig, request: JobRequest) -> None:
    """:class:`RequestInvalid` (400) for a ``max_cost_usd`` that no price backs: a cap
    that cannot be computed is refused at submit, not discovered by the worker."""
    if request.max_cost_usd is None:
        return
    missing = unpriced(models_in_use(config), config.price_per_1k_tokens)
    if missing:
        raise RequestInvalid(
            [
                {
                    "field": "max_cost_usd",
                    "message": "cannot be enforced: LLM_PRICES has no price for model "
                    + ", ".join(missing),
                }
            ]
        )


def job_counter(job_id: str) -> str:
    return f"job/{quote(job_id, safe='')}"


def tenant_counter(tenant: str, day: str) -> str:
    """The counter of ``tenant``'s spend on the UTC ``day`` (``YYYY-MM-DD``)."""
    return f"tenant/{quote(tenant, safe='')}/{day}"


def utc_day() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Limit:
    counter: str
    cap: int
    ttl_s: int
    what: str
    """The cap in words, for the error message."""


@dataclass(frozen=True)
class Reservation:
    """A call's worst case, held on ``limits``' counters until it is settled."""

    limits: tuple[Limit, ...]
    micro_usd: int


class JobBudget:
    """The cost caps of one delivery of a job; shared by its steps' calls."""

    def __init__(
        self,
        store: JobStore,
        prices: Mapping[str, Price],
        job_id: str,
        tenant: str,
        *,
        max_cost_usd: float | None,
        tenant_max_usd_per_day: float | None,
    ) -> None:
        self.store = store
        self.prices = prices
        self.job_id = job_id
        self.tenant = tenant
        self.job_cap = None if max_cost_usd is None else to_micro(max_cost_usd)
        self.tenant_cap = None if tenant_max_usd_per_day is None else to_micro(tenant_max_usd_per_day)
        self._in_flight = 0
        self._settled = asyncio.Event()
        """Set (and replaced) at each settlement: a refused reservation waits for it."""

    @classmethod
    def of(cls, deps: Deps, job: Job, request: JobRequest) -> JobBudget | None:
        """The budget of ``job``, or ``None`` when no cap applies to it."""
        tenant_cap = deps.config.tenant_max_cost_usd_per_day
        if request.max_cost_usd is None and tenant_cap is None:
            return None
        return cls(
            deps.store,
            deps.config.price_per_1k_tokens,
            job.id,
            job.tenant,
            max_cost_usd=request.max_cost_usd,
            tenant_max_usd_per_day=tenant_cap,
        )

    def _limits(self) -> list[Limit]:
        limits: list[Limit] = []
        if self.job_cap is not None:
            limits.append(
                Limit(job_counter(self.job_id), self.job_cap, JOB_COUNTER_TTL_S,
                      f"the job's max_cost_usd of ${to_usd(self.job_cap):g}")
            )
        if self.tenant_cap is not None:
            day = utc_day()
            limits.append(
                Limit(tenant_counter(self.tenant, day), self.tenant_cap, TENANT_COUNTER_TTL_S,
                      f"tenant {self.tenant}'s TENANT_MAX_COST_USD_PER_DAY of "
                      f"${to_usd(self.tenant_cap):g} on {day} (UTC)")
            )
        return limits

    async def reserve(self, step: str, model: str, prompt_tokens: int, max_output_tokens: int) -> Reservation:
        """Hold the worst case of one call on every counter, or raise ``LLMError``
        with ``budget_exceeded`` when it does not fit a cap (after waiting for this
        job's calls in flight to settle, if any are)."""
        price = price_of(self.prices, model)
        if price is None:
            raise LLMError(
                ErrorCode.BUDGET_EXCEEDED,
                f"step {step}: model {model} has no price in LLM_PRICES, so a capped job cannot call it",
            )
        amount = worst_case(price, prompt_tokens, max_output_tokens)
        while True:
            settled = self._settled
            limits = self._limits()
            # Counted while it is being taken: a parallel call refused meanwhile waits
            # for this one to settle instead of failing the job.
            self._in_flight += 1
            try:
                refused = await self._take(limits, amount)
            except BaseException:
                self._done()
                raise
            if refused is None:
                return Reservation(tuple(limits), amount)
            self._in_flight -= 1
            if self._in_flight == 0:
                self._wake()  # calls waiting on this one check again, and fail too
                raise await self._exceeded(refused, step, model, amount, prompt_tokens, max_output_tokens)
            await settled.wait()

    async def _take(self, limits: list[Limit], amount: int) -> Limit | None:
        """Reserve ``amount`` on each counter; on a refusal give back what was taken
        and return the limit that refused."""
        taken: list[Limit] = []
        for limit in limits:
            if await self.store.add_spend(limit.counter, amount, cap=limit.cap, ttl_s=limit.ttl_s) is None:
                for held in taken:
                    await self.store.add_spend(held.counter, -amount, ttl_s=held.ttl_s)
                return limit
            taken.append(limit)
        return None

    async def _exceeded(
        self, limit: Limit, step: str, model: str, amount: int, prompt_tokens: int, max_output: int
    ) -> LLMError:
        spent = await self.store.spent(limit.counter)
        log.info("llm_budget_exceeded", job_id=self.job_id, step=step, counter=limit.counter,
                 spent_micro_usd=spent, call_micro_usd=amount, cap_micro_usd=limit.cap)
        return LLMError(
            ErrorCode.BUDGET_EXCEEDED,
            f"step {step}: the next {model} call may cost up to ${to_usd(amount):.6f} "
            f"(~{prompt_tokens} prompt + {max_output} output tokens); ${to_usd(spent):.6f} "
            f"is spent of {limit.what}",
        )

    async def settle(self, reservation: Reservation, cost: float | None) -> None:
        """Replace the reservation by what the call cost (its trace record's
        ``cost_usd``; ``None``: nothing). A store that does not answer leaves the
        worst case counted, which errs on the safe side."""
        actual = to_micro(cost) if cost is not None else 0
        delta = actual - reservation.micro_usd
        try:
            if delta:
                for limit in reservation.limits:
                    await self.store.add_spend(limit.counter, delta, ttl_s=limit.ttl_s)
        except StoreUnavailable as exc:
            log.warning("llm_budget_settle_failed", job_id=self.job_id, error=str(exc))
        finally:
            self._done()

    def keep(self, reservation: Reservation) -> None:
        """End a call aborted from outside, its worst case left counted: the provider
        may bill all of it, and its task is being cancelled (no store write)."""
        self._done()

    def _done(self) -> None:
        self._in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        self._settled.set()
        self._settled = asyncio.Event()
