"""Admission at the door: the work the gateway accepts.

``Admission`` bounds the requests and windows being served; past it a call is refused at once with
RESOURCE_EXHAUSTED and a retry hint, instead of queueing work that would only time out. So is a request whose
deadline is shorter than the model's queue would make it wait; one whose deadline is shorter than the model's
fastest Triton call gets DEADLINE_EXCEEDED. What is admitted waits for Triton in the model's queue
(core/batching.py), in fair order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ner_gateway.core.deadline import Deadline
from ner_gateway.core.errors import Overloaded, TooLate


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

    def refusal(self, what: str) -> Overloaded:
        """The error a request refused at ``what``'s limit (requests or windows) gets."""
        limit = self.limits.max_requests if what == "requests" else self.limits.max_windows
        return Overloaded(f"the gateway is at capacity ({what}: limit {limit}); retry in "
                          f"{self.limits.retry_after_ms} ms or on another replica", what,
                          self.limits.retry_after_ms)

    @property
    def at_capacity(self) -> bool:
        """A request now would be refused (``request()``)."""
        return self.requests >= self.limits.max_requests

    @contextmanager
    def request(self) -> Iterator[None]:
        if self.requests >= self.limits.max_requests:
            raise self.refusal("requests")
        self.requests += 1
        try:
            yield
        finally:
            self.requests -= 1

    def check_time(self, deadline: Deadline, fastest_s: float, wait_s: float) -> None:
        """Refuse at once a request that could only time out, after using Triton for nothing (a flood of short
        deadlines). DEADLINE_EXCEEDED when what is left of its deadline is shorter than the model's fastest call
        so far (``fastest_s``: no wait would help); RESOURCE_EXHAUSTED with the retry hint when it is shorter than
        the model's queue would make it wait (``wait_s``): a retry later or elsewhere can pass, and it is what makes
        callers that honour the hint back off, so that a gateway swamped by calls that expire recovers."""
        remaining_s = deadline.remaining()
        if remaining_s <= 0:
            raise TooLate("deadline exceeded before the request was read")
        if remaining_s < fastest_s:
            raise TooLate(f"the {remaining_s * 1000:.0f} ms left of the deadline are less than this model's fastest "
                          f"call so far (~{fastest_s * 1000:.0f} ms): not started")
        if remaining_s < wait_s:
            raise Overloaded(f"the gateway's queue for this model would take ~{wait_s * 1000:.0f} ms, more than the "
                             f"{remaining_s * 1000:.0f} ms left of the deadline; retry in "
                             f"{self.limits.retry_after_ms} ms or on another replica", "queue",
                             self.limits.retry_after_ms)

    @contextmanager
    def windows_of(self, count: int) -> Iterator[None]:
        """Hold ``count`` windows; a request bigger than the limit alone is still served when nothing else is."""
        if self.windows and self.windows + count > self.limits.max_windows:
            raise self.refusal("windows")
        self.windows += count
        try:
            yield
        finally:
            self.windows -= count
