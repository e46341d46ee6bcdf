"""Small typed config dataclasses, saved as JSON beside what they produced."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def check_known_keys(config_class: type, data: dict[str, Any], what: str) -> None:
    """Refuse keys the dataclass does not have: a typo in a saved config must not vanish."""
    unknown = set(data) - {field.name for field in fields(config_class)}
    if unknown:
        raise ValueError(f"unknown {what} keys: {sorted(unknown)}")


def is_number(value: Any) -> bool:
    """An int or a float, and not a bool (which Python counts as an int): what a JSON or YAML
    number field may hold."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
