"""A running gateway follows its rollout: two loops, about once a second each, so that a slow look at Triton never
delays a policy change (a rollback) and the reverse:

- the policy file (core/rollout.py ``PolicyFile``), applied to the registry when it changes;
- the versions Triton serves (core/discovery.py ``LiveVersions``), added once checked, removed once gone.

After each round ``on_change`` hears the registry (the versions' roles for the metrics, the batchers to keep).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from ner_gateway.core.discovery import LiveVersions
from ner_gateway.core.registry import ModelRegistry
from ner_gateway.core.rollout import PolicyFile

LOGGER = logging.getLogger(__name__)


def warn_unserved(registry: ModelRegistry) -> None:
    """Log what the rollout policy names but the registry does not serve (at startup and on each policy change)."""
    for line in registry.unserved():
        LOGGER.warning("rollout policy: %s", line)


class RolloutFollower:
    def __init__(self, registry: ModelRegistry, versions: LiveVersions, policy_file: PolicyFile | None,
                 interval_s: float, on_change: Callable[[ModelRegistry], None]) -> None:
        self.registry = registry
        self.versions = versions
        self.policy_file = policy_file
        self.interval_s = interval_s
        self.on_change = on_change
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loops = [("rollout-versions", self._follow_versions)]
        if self.policy_file is not None:
            loops.append(("rollout-policy", self._follow_policy))
        self._tasks = [asyncio.create_task(self._every_interval(what, step), name=what) for what, step in loops]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow_policy(self) -> None:
        assert self.policy_file is not None
        policy = self.policy_file.poll()
        if policy is not None:
            self.registry.policy = policy
            warn_unserved(self.registry)
            self.on_change(self.registry)

    async def _follow_versions(self) -> None:
        await self.versions.poll()
        self.on_change(self.registry)  # readiness alone can change which version is stable

    async def _every_interval(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await step()
            except Exception:  # keep following whatever one round hit
                LOGGER.exception("%s: one round failed", what)
