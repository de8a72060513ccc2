"""The model families the farm knows, one pure module each (see base.py for what a family says).

Every module of this package that defines `FAMILY` is a family; adding one is adding its module
here, its GPU half under farm/gpu/families/, and tests. Nothing else in the farm names a family:
the rest asks this registry.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator

from farm.families.base import Draft, Family, Role, ShotInputs, Variant

__all__ = ["FAMILIES", "Draft", "Family", "Role", "ShotInputs", "Variant", "by_class", "family", "for_role"]


def _discover() -> Iterator[Family]:
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found = getattr(module, "FAMILY", None)
        if isinstance(found, Family):
            yield found


# Keyframe families first, then video, each in name order: what `farm families` prints.
FAMILIES: dict[str, Family] = {f.name: f for f in sorted(_discover(), key=lambda f: (f.role != "keyframe", f.name))}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; expected one of {', '.join(FAMILIES)}") from None


def for_role(role: str) -> list[Family]:
    return [f for f in FAMILIES.values() if f.role == role]


def by_class(class_name: str) -> Family | None:
    """The family a saved pipeline's model_index.json `_class_name` names."""
    return next((f for f in FAMILIES.values() if class_name in f.classes), None)
