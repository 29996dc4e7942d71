"""The rollout policy: per model, the stable version, a canary that answers a share of the calls naming no version,
and a shadow that is mirrored a share of the stable version's calls. One YAML file (a mounted ConfigMap), re-read
when it changes; a file that does not parse or validate keeps the last good policy.

    models:
      wnut16:
        stable: "3"
        canary: {version: "4", share: 0.1}
        shadow: {version: "4", share: 1.0}
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ner_gateway.secret_files import FileStamp, file_stamp

LOGGER = logging.getLogger(__name__)

Version = Annotated[str, Field(pattern=r"^[0-9]+$")]  # Triton's version folders; YAML's 3 and "3" alike


class Role(StrEnum):
    STABLE = "stable"
    CANARY = "canary"
    SHADOW = "shadow"
    PINNED = "pinned"  # served only to calls that name it


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)


class Share(_Strict):
    version: Version
    share: float = Field(gt=0, le=1)


class ModelPolicy(_Strict):
    stable: Version | None = None  # None: the highest version ready
    canary: Share | None = None
    shadow: Share | None = None

    @model_validator(mode="after")
    def _candidates_are_not_the_stable(self) -> ModelPolicy:
        for role, share in (("canary", self.canary), ("shadow", self.shadow)):
            if share is not None and share.version == self.stable:
                raise ValueError(f"the {role} version {share.version} is the stable version")
        return self

    @property
    def candidates(self) -> frozenset[str]:
        """The canary and shadow versions."""
        return frozenset(share.version for share in (self.canary, self.shadow) if share is not None)


class RolloutPolicy(_Strict):
    models: dict[str, ModelPolicy] = Field(default_factory=dict)

    def of(self, model: str) -> ModelPolicy:
        return self.models.get(model) or _NO_POLICY

    @classmethod
    def parse(cls, text: str) -> RolloutPolicy:
        """ValueError (with what is wrong) for a file that is not YAML or not a policy."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"not YAML: {e}") from e
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            raise ValueError(str(e)) from e


_NO_POLICY = ModelPolicy()
_UNREADABLE: FileStamp = (-1, -1, -1)


class PolicyFile:
    """The policy file, re-read by ``poll`` when its mtime, size or inode changes (a ConfigMap update swaps a
    symlink). ``on_read`` hears each read's outcome ("applied" or "invalid")."""

    def __init__(self, path: Path, on_read: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.on_read = on_read
        self._stamp: FileStamp | None = None

    def load(self) -> RolloutPolicy:
        """The first read, at startup: a missing or bad file is an error (ValueError or OSError) there."""
        self._stamp = file_stamp(self.path)
        policy = RolloutPolicy.parse(self.path.read_text())
        self._heard("applied")
        return policy

    def poll(self) -> RolloutPolicy | None:
        """The new policy when the file changed and holds a valid one; None when it did not change, or when it
        cannot be read or is invalid (a WARNING, and the last good policy stays)."""
        try:
            stamp = file_stamp(self.path)
            if stamp == self._stamp:
                return None
            self._stamp = stamp
            policy = RolloutPolicy.parse(self.path.read_text())
        except (OSError, ValueError) as e:
            if isinstance(e, OSError):
                if self._stamp == _UNREADABLE:
                    return None  # said once: until it can be read again
                self._stamp = _UNREADABLE
            LOGGER.warning("rollout policy %s not applied, the last good one stays: %s", self.path, e)
            self._heard("invalid")
            return None
        self._heard("applied")
        LOGGER.info("rollout policy %s applied: %s", self.path, policy.model_dump(exclude_none=True))
        return policy

    def _heard(self, outcome: str) -> None:
        if self.on_read is not None:
            self.on_read(outcome)
