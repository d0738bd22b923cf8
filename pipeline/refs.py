"""Artifact references: ``name``, ``name:vN``, ``name:ALIAS``, optionally ``entity/project/`` first.

``name`` alone means ``name:latest``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import RefError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
_NAME = re.compile(NAME_PATTERN)
_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_VERSION = re.compile(r"^v(0|[1-9][0-9]*)$")
_PATH_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class Ref:
    name: str
    tag: str = "latest"  # "vN" or an alias
    entity: str | None = None
    project: str | None = None

    @property
    def version(self) -> int | None:
        """The version number when the tag is ``vN``, else None (an alias)."""
        m = _VERSION.match(self.tag)
        return int(m.group(1)) if m else None

    @property
    def is_alias(self) -> bool:
        return self.version is None

    def __str__(self) -> str:
        prefix = "/".join(p for p in (self.entity, self.project) if p)
        return f"{prefix + '/' if prefix else ''}{self.name}:{self.tag}"


def validate_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise RefError(
            f"invalid artifact name {name!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def validate_alias(alias: str) -> str:
    if not _ALIAS.match(alias or ""):
        raise RefError(f"invalid alias {alias!r}: use letters, digits, '.', '_' or '-'")
    if _VERSION.match(alias):
        raise RefError(f"invalid alias {alias!r}: names of the form vN are versions, not aliases")
    return alias


def parse_ref(text: str) -> Ref:
    """Parse a reference, or raise `RefError` saying what form is expected."""
    expected = "expected NAME, NAME:vN or NAME:ALIAS, optionally prefixed by ENTITY/PROJECT/"
    if not isinstance(text, str) or not text.strip():
        raise RefError(f"empty artifact reference: {expected}")
    raw = text.strip()
    path, sep, tag = raw.rpartition(":") if ":" in raw else (raw, "", "")
    if sep and not tag:
        raise RefError(f"cannot parse artifact reference {text!r}: nothing after ':'; {expected}")
    parts = path.split("/")
    if len(parts) == 2:
        entity, project, name = None, parts[0], parts[1]
    elif len(parts) == 3:
        entity, project, name = parts
    elif len(parts) == 1:
        entity, project, name = None, None, parts[0]
    else:
        raise RefError(f"cannot parse artifact reference {text!r}: too many '/' parts; {expected}")
    for part in (entity, project):
        if part is not None and not _PATH_PART.match(part):
            raise RefError(f"cannot parse artifact reference {text!r}: bad entity/project {part!r}; {expected}")
    if not _NAME.match(name):
        raise RefError(f"cannot parse artifact reference {text!r}: bad name {name!r}; {expected}")
    tag = tag or "latest"
    if not (_VERSION.match(tag) or _ALIAS.match(tag)):
        raise RefError(f"cannot parse artifact reference {text!r}: bad version or alias {tag!r}; {expected}")
    return Ref(name=name, tag=tag, entity=entity, project=project)
