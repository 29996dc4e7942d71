"""Shadow traffic: a share of the stable version's calls is run again on a candidate version after the live answer
has been sent, and the two answers are compared entity by entity. Only counts leave: per label, the entities the
candidate agrees on, adds, drops or relabels, and the texts whose entities changed.

Shadow work has its own budget and is the first refused when the gateway is busy: a mirrored call never delays or
changes a live one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ner_gateway.core.admission import Admission
from ner_gateway.core.domain import Document

AGREED, ADDED, DROPPED, RELABELED_FROM, RELABELED_TO = "agreed", "added", "dropped", "relabeled_from", "relabeled_to"


@dataclass
class ShadowScore:
    """``entities[(label, outcome)]``: counts; for a relabel, the live label under relabeled_from and the candidate's
    under relabeled_to. Precision against the live model: agreed / (agreed + added + relabeled_to); recall: agreed /
    (agreed + dropped + relabeled_from)."""

    entities: Counter[tuple[str, str]] = field(default_factory=Counter)
    same_documents: int = 0
    changed_documents: int = 0


def compare(live: list[Document], candidate: list[Document]) -> ShadowScore:
    """Entity by entity (label, start, end), text by text; entities match by their exact span."""
    score = ShadowScore()
    for live_document, candidate_document in zip(live, candidate, strict=True):
        live_spans = {(e.start, e.end): e.label for e in live_document.entities}
        candidate_spans = {(e.start, e.end): e.label for e in candidate_document.entities}
        changed = False
        for span, label in live_spans.items():
            other = candidate_spans.get(span)
            if other is None:
                score.entities[(label, DROPPED)] += 1
                changed = True
            elif other == label:
                score.entities[(label, AGREED)] += 1
            else:
                score.entities[(label, RELABELED_FROM)] += 1
                score.entities[(other, RELABELED_TO)] += 1
                changed = True
        for span, label in candidate_spans.items():
            if span not in live_spans:
                score.entities[(label, ADDED)] += 1
                changed = True
        if changed:
            score.changed_documents += 1
        else:
            score.same_documents += 1
    return score


class ShadowBudget:
    """At most ``max_requests`` mirrored calls at once, and none while the live work holds half of its admission
    limits or more (``admission``): shadow is the first work refused."""

    def __init__(self, max_requests: int, admission: Admission | None = None) -> None:
        self.max_requests = max_requests
        self.admission = admission
        self.running = 0

    def busy(self) -> bool:
        admission = self.admission
        if self.running >= self.max_requests:
            return True
        return admission is not None and (admission.requests * 2 > admission.limits.max_requests
                                          or admission.windows * 2 > admission.limits.max_windows)

    def take(self) -> bool:
        """Reserve a slot; False (refused) when busy."""
        if self.busy():
            return False
        self.running += 1
        return True

    def release(self) -> None:
        self.running -= 1
