"""The schema-free half of config.py: `--set` overrides on a YAML tree, and validation errors told
as one line that names the key and, for a typo, the nearest valid one.

    tree = apply_overrides(yaml.safe_load(text), ["training.learning_rate=1e-4"])
"""

from __future__ import annotations

import difflib
from typing import Any

import yaml
from pydantic import BaseModel

from stages.common.errors import StageError


def nearest(value: str, known) -> str:
    """'; did you mean X?' for the closest of `known`, or '' when none is close."""
    close = difflib.get_close_matches(value, list(known), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid field names of the (nested) model that holds the key at `loc`."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def describe(err: dict[str, Any], root: type[BaseModel]) -> str:
    """One pydantic error as `unknown key ...; did you mean ...?`, `missing key ...` or `key: message`."""
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _fields_at(root, loc), n=1)
        hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
        return f"unknown key {key!r}{hint}"
    if err["type"] == "missing":
        return f"missing key {key!r}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{key}: {msg}" if loc else msg


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise StageError(f"--set {dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """``["training.learning_rate=1e-4"]`` -> ``[("training.learning_rate", 0.0001)]`` (YAML-typed)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise StageError(f"--set {item!r} is not KEY=VALUE; write e.g. --set training.learning_rate=1e-4")
        parsed.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return parsed


def apply_overrides(tree: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`tree` with each KEY=VALUE override set in place (sections made as needed); returns `tree`."""
    for key, value in parse_overrides(overrides):
        set_dotted(tree, key, value)
    return tree
