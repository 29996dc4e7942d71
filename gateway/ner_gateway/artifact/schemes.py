"""Tagging schemes, defined once: the role each tag prefix plays in an entity, and the prefix each position gets.

A tag is ``O`` or ``PREFIX-type`` (``B-PER``). The builder writes tags from entity spans and reads them back
(``ner_builder.spans``: training, augmentation, evaluation); the gateway decodes model output by the roles
(``ner_gateway.core.decoding``). The manifest records a model's scheme by its value ("BIO", "BMES", ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import IntEnum, StrEnum

OUTSIDE = "O"


class Role(IntEnum):
    """The position in its entity that a tag's prefix marks."""

    OUTSIDE = 0
    BEGIN = 1
    INSIDE = 2
    END = 3
    SINGLE = 4


class TaggingScheme(StrEnum):
    BIO = "BIO"
    IOB1 = "IOB1"  # I- throughout; B- only starts an entity that directly follows one of its type
    BIOES = "BIOES"
    BILOU = "BILOU"
    BMES = "BMES"

    @property
    def roles(self) -> Mapping[str, Role]:
        """Prefix -> role, in label order (BIO: B, I; BMES: B, M, E, S)."""
        return _ROLES[self]

    @property
    def prefixes(self) -> tuple[str, ...]:
        return tuple(self.roles)

    def prefix(self, starts: bool, ends: bool, follows_same_type: bool = False) -> str:
        """The prefix of a position that starts and/or ends its entity; ``follows_same_type``: the entity
        directly follows one of its own type (only IOB1 marks that, and only that, with B-)."""
        if starts:
            role = Role.SINGLE if ends else Role.BEGIN
        else:
            role = Role.END if ends else Role.INSIDE
        if self is TaggingScheme.IOB1 and not (starts and follows_same_type):
            role = Role.INSIDE
        return _WRITTEN[self][role]


_ROLES: dict[TaggingScheme, dict[str, Role]] = {
    TaggingScheme.BIO: {"B": Role.BEGIN, "I": Role.INSIDE},
    TaggingScheme.IOB1: {"B": Role.BEGIN, "I": Role.INSIDE},
    TaggingScheme.BIOES: {"B": Role.BEGIN, "I": Role.INSIDE, "E": Role.END, "S": Role.SINGLE},
    TaggingScheme.BILOU: {"B": Role.BEGIN, "I": Role.INSIDE, "L": Role.END, "U": Role.SINGLE},
    TaggingScheme.BMES: {"B": Role.BEGIN, "M": Role.INSIDE, "E": Role.END, "S": Role.SINGLE},
}


def _written(roles: Mapping[str, Role]) -> dict[Role, str]:
    """Role -> the prefix written for it. Without end and single prefixes (BIO, IOB1) an entity's last position
    is written as inside and a one-position entity as a beginning."""
    by_role = {role: prefix for prefix, role in roles.items()}
    by_role.setdefault(Role.END, by_role[Role.INSIDE])
    by_role.setdefault(Role.SINGLE, by_role[Role.BEGIN])
    return by_role


_WRITTEN = {scheme: _written(roles) for scheme, roles in _ROLES.items()}


def split_tag(tag: str) -> tuple[str, str] | None:
    """(prefix, entity type) of ``PREFIX-type``; None for ``O`` and any other tag without a ``-``."""
    prefix, sep, kind = tag.partition("-")
    return (prefix, kind) if sep else None


def detect_tagging_scheme(labels: Iterable[str]) -> TaggingScheme:
    """Infer the tagging scheme from the prefixes of a label set (the builder can override it)."""
    prefixes = {parts[0] for label in labels if (parts := split_tag(label)) is not None}
    if "M" in prefixes:
        return TaggingScheme.BMES
    if prefixes & {"L", "U"}:
        return TaggingScheme.BILOU
    if prefixes & {"E", "S"}:
        return TaggingScheme.BIOES
    if prefixes == {"I"}:
        return TaggingScheme.IOB1
    return TaggingScheme.BIO
