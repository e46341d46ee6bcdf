"""Which objects a frontal chest model may score, judged from the header before any pixel decode.

A CT slice, a knee film or a lateral chest view scored by a frontal chest model is a
confident wrong answer on the worklist. Such objects become `skipped` rows with the
reason instead: one row each, no probability, never flagged.

The check reads three header fields, as `header_metadata` names them in the metadata
dict: `modality` (Modality), `body_part` (BodyPartExamined), `view_position`
(ViewPosition). A field the header lacks is in scope (many CR/DX films leave
BodyPartExamined empty), and so are PNG and JPEG files, which have no header at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

ANY = "any"
# setting name (the --scope key) -> (metadata key, DICOM keyword, for the reason)
CHECKED_FIELDS = {
    "modality": ("modality", "Modality"),
    "body_part": ("body_part", "BodyPartExamined"),
    "view": ("view_position", "ViewPosition"),
}
CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")  # DICOM CS: what a well-formed value can hold


def normalise(value: Any) -> str | None:
    text = str(value).strip().upper() if value is not None else ""
    return text or None


@dataclass(frozen=True)
class Scope:
    """Accepted values of each checked field; None accepts any value."""

    modality: tuple[str, ...] | None = ("CR", "DX")
    body_part: tuple[str, ...] | None = ("CHEST", "THORAX", "LUNG")
    view: tuple[str, ...] | None = ("PA", "AP")

    def __post_init__(self) -> None:
        for setting in fields(self):
            values = getattr(self, setting.name)
            if values is not None:
                accepted = tuple(dict.fromkeys(filter(None, map(normalise, values))))
                if not accepted:
                    raise ValueError(f"scope {setting.name} accepts no value; give values or {ANY!r}")
                object.__setattr__(self, setting.name, accepted)

    @classmethod
    def from_settings(cls, settings: Iterable[str]) -> Scope:
        """`KEY=V1,V2` or `KEY=any` per setting (KEY: modality, body_part, view); unnamed keys keep their defaults."""
        changes: dict[str, tuple[str, ...] | None] = {}
        for setting in settings:
            key, sep, values = setting.partition("=")
            key = key.strip().lower().replace("-", "_")
            if not sep or key not in CHECKED_FIELDS:
                raise ValueError(f"scope setting {setting!r}: expected KEY=VALUES with KEY one of {', '.join(CHECKED_FIELDS)}")
            changes[key] = None if values.strip().lower() == ANY else tuple(values.split(","))
        return replace(cls(), **changes)


def shown(value: str) -> str:
    """A header value as the reason shows it: code strings as they are, anything else not at all
    (a damaged header can put any text, a name included, where a code string belongs)."""
    return value if CODE_STRING.fullmatch(value) else "<not a code string>"


def skip_reason(meta: Mapping[str, Any], scope: Scope) -> str | None:
    """Why the object described by `meta` is out of `scope`, or None when it may be scored."""
    for setting, (meta_key, keyword) in CHECKED_FIELDS.items():
        accepted = getattr(scope, setting)
        value = normalise(meta.get(meta_key))
        if accepted is not None and value is not None and value not in accepted:
            return f"out of scope: {keyword} {shown(value)} is not one of {','.join(accepted)}"
    return None
