"""Dataclasses read back from JSON or YAML (engine.json's records, a --config file): a key
that the dataclass has no field for is refused by name, never dropped in silence."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], values: Any, what: str) -> T:
    """`cls(**values)`; a ValueError naming any key `cls` has no field for, or any field
    without a default that `values` lacks."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{what}: expected a mapping of keys to values, got {type(values).__name__}")
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    unknown = sorted(str(key) for key in values if key not in names)
    if unknown:
        raise ValueError(f"{what}: unknown keys {', '.join(unknown)} (known: {', '.join(names)})")
    missing = [f.name for f in fields if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{what}: missing {', '.join(missing)}")
    return cls(**values)


def to_dict(record: Any) -> dict[str, Any]:
    """The record's fields in order, leaving out those that are None (keys that were never written)."""
    return {key: value for key, value in dataclasses.asdict(record).items() if value is not None}
