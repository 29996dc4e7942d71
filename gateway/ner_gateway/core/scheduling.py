"""Who sends what to Triton, and when: admission at the door and fair shares of Triton's queue.

Triton's dynamic batcher serves its queue in arrival order, and a call it has started cannot be stopped. A
100,000-character text is ~260 windows of 512 tokens (~85 s of one model instance on these CPUs): sent at
once, they filled Triton's queue and every other caller waited behind them, long after their own deadlines
had passed. So the gateway keeps Triton's queue short and decides the order itself, where deadlines and
cancellation are exact:

- ``Admission`` bounds the work the gateway accepts (requests, windows); past it a call is refused at once
  with RESOURCE_EXHAUSTED and a retry hint, instead of queueing work that would only time out.
- ``FairScheduler`` (one per model) lets at most ``capacity_tokens`` padded tokens be in Triton at a time,
  and at most ``request_tokens`` of them for one request, so a long document runs one bounded call after
  another and leaves the other instances to everyone else. Waiting calls are granted in order of what their
  request has had so far (fewest tokens first), so a one-sentence call overtakes the next window of a
  long one. A call whose request was cancelled or ran out of time while waiting is never sent; one already
  sent is cancelled, and Triton drops it if it is still in its queue (measured: see README).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

from ner_gateway.errors import DeadlineExceeded, Overloaded, TooLate

CALL_TIME_WEIGHT = 0.05  # of the latest call in typical_call_s: follows a change of load within ~20 calls


@dataclass(frozen=True)
class AdmissionLimits:
    max_requests: int
    max_windows: int
    retry_after_ms: int


class Admission:
    """Counts the requests and windows being served; refuses what would go past the limits."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.requests = 0
        self.windows = 0

    def _refuse(self, what: str, limit: int) -> Overloaded:
        return Overloaded(f"the gateway is at capacity ({what}: limit {limit}); retry in "
                          f"{self.limits.retry_after_ms} ms or on another replica", what,
                          self.limits.retry_after_ms)

    @contextmanager
    def request(self) -> Iterator[None]:
        if self.requests >= self.limits.max_requests:
            raise self._refuse("requests", self.limits.max_requests)
        self.requests += 1
        try:
            yield
        finally:
            self.requests -= 1

    @staticmethod
    def check_time(remaining_s: float, typical_call_s: float) -> None:
        """Refuse (DEADLINE_EXCEEDED, at once) a request whose remaining deadline is shorter than a Triton call
        takes now: it could only time out, after using Triton for nothing (a flood of short deadlines)."""
        if remaining_s <= 0:
            raise TooLate("deadline exceeded before the request was read")
        if remaining_s < typical_call_s:
            raise TooLate(f"the {remaining_s * 1000:.0f} ms left of the deadline are less than an inference takes "
                          f"now (~{typical_call_s * 1000:.0f} ms): not started")

    @contextmanager
    def windows_of(self, count: int) -> Iterator[None]:
        """Hold ``count`` windows; a request bigger than the limit alone is still served when nothing else is."""
        if self.windows and self.windows + count > self.limits.max_windows:
            raise self._refuse("windows", self.limits.max_windows)
        self.windows += count
        try:
            yield
        finally:
            self.windows -= count


@dataclass(eq=False)
class _Waiter:
    owner: object
    tokens: int
    seq: int
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class FairScheduler:
    """Grants Triton calls, bounded by tokens in flight overall and per request, fairest request first."""

    def __init__(self, capacity_tokens: int, request_tokens: int) -> None:
        self.capacity_tokens = capacity_tokens
        self.request_tokens = request_tokens
        self.inflight = 0
        self._by_owner: dict[object, int] = {}  # tokens in Triton, per request
        self._served: dict[object, int] = {}  # tokens granted so far, per request with calls in Triton or waiting
        self._waiting: list[_Waiter] = []
        self._seq = itertools.count()
        self.typical_call_s = 0.0  # moving average of a call's time in Triton (its queue included)

    @property
    def waiting_calls(self) -> int:
        return len(self._waiting)

    def _fits(self, owner: object, tokens: int) -> tuple[bool, bool]:
        """(fits the request's own share, fits the overall capacity); an idle request or Triton takes any call."""
        mine = self._by_owner.get(owner, 0)
        return (not mine or mine + tokens <= self.request_tokens,
                not self.inflight or self.inflight + tokens <= self.capacity_tokens)

    def _take(self, owner: object, tokens: int) -> None:
        self.inflight += tokens
        self._by_owner[owner] = self._by_owner.get(owner, 0) + tokens
        self._served[owner] = self._served.get(owner, 0) + tokens

    def _forget_if_idle(self, owner: object) -> None:
        if owner not in self._by_owner and not any(w.owner is owner for w in self._waiting):
            self._served.pop(owner, None)

    def _release(self, owner: object, tokens: int) -> None:
        self.inflight -= tokens
        left = self._by_owner[owner] - tokens
        if left:
            self._by_owner[owner] = left
        else:
            del self._by_owner[owner]
        self._grant()
        self._forget_if_idle(owner)

    def _grant(self) -> None:
        """Grant waiting calls, least-served request first (fewest tokens granted so far: a sentence goes before
        the next call of a long document). A call held back only by its own request's share lets others pass;
        one held back by the overall capacity stops the round, so a large call is not starved by small ones."""
        while self._waiting:
            ready = [w for w in self._waiting if self._fits(w.owner, w.tokens)[0]]
            if not ready:
                return
            best = min(ready, key=lambda w: (self._served.get(w.owner, 0), w.seq))
            if not self._fits(best.owner, best.tokens)[1]:
                return
            self._waiting.remove(best)
            self._take(best.owner, best.tokens)
            best.granted.set_result(None)

    @asynccontextmanager
    async def call(self, owner: object, tokens: int, deadline: float) -> AsyncIterator[None]:
        """Hold a place for one Triton call of ``tokens`` padded tokens for request ``owner`` until the block
        ends. Raises DeadlineExceeded when ``deadline`` (loop time) passes first; cancellation leaves no trace."""
        waiter = _Waiter(owner, tokens, next(self._seq))
        self._waiting.append(waiter)
        self._grant()
        if not waiter.granted.done():
            timeout = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(asyncio.shield(waiter.granted), max(timeout, 0))
            except BaseException as e:
                if waiter.granted.done():  # granted in the same instant: hand the place back
                    self._release(owner, tokens)
                else:
                    self._waiting.remove(waiter)
                    self._grant()
                    self._forget_if_idle(owner)
                if isinstance(e, TimeoutError):
                    raise DeadlineExceeded("deadline exceeded while waiting for the inference server") from None
                raise
        granted_at = asyncio.get_running_loop().time()
        try:
            yield
        finally:
            self._release(owner, tokens)
            took = asyncio.get_running_loop().time() - granted_at
            self.typical_call_s += CALL_TIME_WEIGHT * (took - self.typical_call_s)


def plan_calls(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Cut windows into Triton calls: indices sorted by padded length, at most ``max_rows`` rows and
    ``max_tokens`` padded tokens (rows x longest) per call; one row always fits."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    calls: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Sorted ascending, so the new row is the call's longest.
        if current and (len(current) >= max_rows or (len(current) + 1) * lengths[index] > max_tokens):
            calls.append(current)
            current = []
        current.append(index)
    if current:
        calls.append(current)
    return calls
