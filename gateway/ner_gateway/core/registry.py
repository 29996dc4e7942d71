"""The models the gateway serves, every version of each, and how a request finds its own: by name (or the default),
then by the version it pins, else the rollout policy's (core/rollout.py) stable version or its canary."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ner_gateway.artifact.manifest import ModelManifest
from ner_gateway.core.batching import InputEncoder
from ner_gateway.core.decoding import LabelTable
from ner_gateway.core.errors import ConfigurationError, ModelNotFound, echo
from ner_gateway.core.ports import ServedModel
from ner_gateway.core.rollout import Role, RolloutPolicy
from ner_gateway.core.tokenizing import TextTokenizer


@dataclass(frozen=True)
class NerModel:
    manifest: ModelManifest
    tokenizer: TextTokenizer
    encoder: InputEncoder
    labels: LabelTable
    served: ServedModel
    window_stride: int  # tokens shared by consecutive windows of a long text

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def sequence_buckets(self) -> tuple[int, ...]:
        """Lengths every input is padded up to: a TensorRT engine's profile maxima; () for ragged models."""
        engine = self.manifest.engine
        return engine.sequence_buckets if engine is not None else ()


@dataclass(frozen=True)
class ServedVersion:
    """A version as ListModels shows it: its role and traffic share under the policy, and its readiness."""

    model: NerModel
    role: Role
    share: float
    ready: bool


def _number(model: NerModel) -> int:
    return int(model.version)


class ModelRegistry:
    """Versions come and go while the gateway runs (core/discovery.py ``LiveVersions``); ``ready`` says whether a
    version can take calls now (the inference server's last word), so that a version on its way out is passed over
    before it is removed. ``draw`` returns a number in [0, 1) per canary or shadow decision."""

    def __init__(self, models: list[NerModel], default_model: str | None = None,
                 policy: RolloutPolicy | None = None, ready: Callable[[ServedModel], bool] | None = None,
                 draw: Callable[[], float] = random.random) -> None:
        self._versions: dict[str, dict[str, NerModel]] = {}
        self._ordered: dict[str, list[NerModel]] = {}  # highest version first (resolution walks it per call)
        for model in models:
            self.add(model)
        self.policy = policy or RolloutPolicy()
        self.ready = ready or (lambda served: True)
        self.draw = draw
        names = sorted(self._versions)
        self.default_name = default_model or names[0]
        if self.default_name not in self._versions:
            raise ConfigurationError(f"default model {self.default_name!r} is not in the repository "
                                     f"(found: {', '.join(names)})")

    def add(self, model: NerModel) -> None:
        self._versions.setdefault(model.name, {})[model.version] = model
        self._order(model.name)

    def remove(self, model: NerModel) -> None:
        """No new call resolves to ``model``; calls that already hold it finish with it."""
        versions = self._versions.get(model.name, {})
        if versions.get(model.version) is model:
            del versions[model.version]
            self._order(model.name)

    def _order(self, name: str) -> None:
        self._ordered[name] = sorted(self._versions[name].values(), key=_number, reverse=True)

    def versions(self, name: str) -> list[NerModel]:
        """The served versions of ``name``, lowest first."""
        return self._ordered.get(name, [])[::-1]

    def find(self, name: str, version: str) -> NerModel | None:
        return self._versions.get(name or self.default_name, {}).get(version)

    def all_versions(self) -> list[NerModel]:
        return [model for name in sorted(self._versions) for model in self.versions(name)]

    def stable(self, name: str) -> NerModel | None:
        """The policy's stable version while it is served and ready. Else (no stable in the policy, or it is not
        served or not ready) the highest ready version that is not the policy's canary or shadow: a candidate takes
        over only when nothing else is ready. Nothing ready at all (calls fail UNAVAILABLE until a version is back):
        the policy's stable, or the highest."""
        ordered = self._ordered.get(name)
        if not ordered:
            return None
        if len(ordered) == 1:
            return ordered[0]
        policy = self.policy.of(name)
        chosen = self._versions[name].get(policy.stable or "")
        if chosen is not None and self.ready(chosen.served):
            return chosen
        candidates = policy.candidates
        fallback = None
        for model in ordered:
            if self.ready(model.served):
                if model.version not in candidates:
                    return model
                fallback = fallback or model
        return fallback or chosen or ordered[0]

    def unserved(self) -> list[str]:
        """What the policy names that is not served (a typo, a version not loaded yet), as log lines."""
        found = []
        for name, policy in self.policy.models.items():
            named = [policy.stable] + [share.version for share in (policy.canary, policy.shadow) if share]
            missing = [v for v in named if v and v not in self._versions.get(name, {})]
            if missing:
                found.append(f"model {name}: version {', '.join(missing)} not served (served: "
                             f"{', '.join(m.version for m in self.versions(name)) or 'none'})")
        return found

    def get(self, name: str = "", version: str = "") -> NerModel:
        """The model a call is answered by: ``version`` when it pins one, else the stable version, or the canary for
        its share of calls. ModelNotFound names what is served."""
        name = name or self.default_name
        versions = self._versions.get(name)
        if not versions:
            raise ModelNotFound(f"model {echo(name)} not found; available: {', '.join(sorted(self._names()))}")
        if version:
            model = versions.get(version)
            if model is None:
                raise ModelNotFound(f"model {echo(name)} has no version {echo(version)}; served: "
                                    f"{', '.join(m.version for m in self.versions(name))}")
            return model
        canary = self.policy.of(name).canary
        if canary is not None:
            candidate = versions.get(canary.version)
            if candidate is not None and self.ready(candidate.served) and self.draw() < canary.share:
                return candidate
        stable = self.stable(name)
        assert stable is not None
        return stable

    def shadow_for(self, model: NerModel) -> NerModel | None:
        """The version a call answered by ``model`` is mirrored to, if any: only the stable version's calls, for the
        shadow's share of them, while the shadow is served and ready."""
        shadow = self.policy.of(model.name).shadow
        if shadow is None or shadow.version == model.version:
            return None
        candidate = self._versions.get(model.name, {}).get(shadow.version)
        if candidate is None or not self.ready(candidate.served) or self.stable(model.name) is not model:
            return None
        return candidate if self.draw() < shadow.share else None

    def listing(self, name: str) -> list[ServedVersion]:
        """Every served version of ``name`` with its role now, lowest version first."""
        policy, stable = self.policy.of(name), self.stable(name)
        listed = []
        for model in self.versions(name):
            role, share = Role.PINNED, 0.0
            if model is stable:
                role = Role.STABLE
            elif policy.canary is not None and policy.canary.version == model.version:
                role, share = Role.CANARY, policy.canary.share
            elif policy.shadow is not None and policy.shadow.version == model.version:
                role, share = Role.SHADOW, policy.shadow.share
            listed.append(ServedVersion(model, role, share, self.ready(model.served)))
        return listed

    def _names(self) -> list[str]:
        return [name for name, versions in self._versions.items() if versions]

    def __iter__(self) -> Iterator[NerModel]:
        """Each model's stable version, by name."""
        for name in sorted(self._names()):
            stable = self.stable(name)
            if stable is not None:
                yield stable
