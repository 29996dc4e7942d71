"""A request's time budget: the one place that says how much of it is left at each stage.

The pipeline makes one ``Deadline`` per request (from what is left of the caller's gRPC deadline, or the default);
admission, the batcher's queue and the inference backend (across its retries) all read it, and each raises the
same ``DeadlineExceeded`` when it is spent. Times are the event loop's clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from ner_gateway.core.errors import DeadlineExceeded


class Deadline:
    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at  # the event loop's time when the budget is spent

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(asyncio.get_running_loop().time() + seconds)

    @classmethod
    def latest(cls, deadlines: Iterable[Deadline]) -> Deadline:
        """The budget of work done for several requests at once (a shared call): until the last one's ends."""
        return cls(max(d.at for d in deadlines))

    def remaining(self) -> float:
        return self.at - asyncio.get_running_loop().time()

    def check(self, stage: str) -> float:
        """The seconds left; raises DeadlineExceeded ("deadline exceeded {stage}") when none are."""
        left = self.remaining()
        if left <= 0:
            raise DeadlineExceeded(f"deadline exceeded {stage}")
        return left

    def __repr__(self) -> str:
        return f"Deadline(at={self.at:.3f})"
