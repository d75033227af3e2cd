"""One way for the typed configs to travel through JSON and checkpoints.

Every config is a dataclass; :class:`DictConfig` gives it ``from_dict`` (unknown keys ignored, so
that files written by newer or older versions still load; JSON lists back to the tuples the fields
are typed as) and ``to_dict`` (tuples as lists, as JSON writes them).
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, TypeVar

C = TypeVar("C", bound="DictConfig")


class DictConfig:
    """Mixin for dataclass configs: ``from_dict`` / ``to_dict``."""

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        tuples = {f.name for f in fields(cls) if str(f.type).startswith("tuple")}
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
