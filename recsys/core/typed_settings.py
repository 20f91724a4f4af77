"""Build settings as one typed schema: each stage's settings are frozen pydantic dataclasses
next to the code that owns them, with their bounds and a description on every field, so
the TOML file, `--set section.key=value`, named flags and `recsys tune` are all checked by
the same rules before any work starts, and `recsys settings` / the docs list them from it.

Numbers and switches are strict (`max_epochs = "5"`, `true` for a count, 1.5 for an
integer are refused, never coerced); a float field takes an integer.
"""

import dataclasses
import enum
import math
import tomllib
from collections.abc import Iterator
from typing import Any, Literal, TypeVar, dataclass_transform

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

SCHEMA_CONFIG = ConfigDict(extra="forbid", validate_default=False)


Section = TypeVar("Section")


@dataclass_transform(frozen_default=True, field_specifiers=(Field, dataclasses.field))
def settings_section(cls: type[Section]) -> type[Section]:
    """Decorate one section's class: frozen, unknown names refused, fields validated."""
    return dataclass(frozen=True, config=SCHEMA_CONFIG)(cls)  # type: ignore[return-value]


def whole(
    default: int | None, low: int, high: int, description: str, multiple_of: int | None = None
) -> Any:
    """An integer setting within [low, high] (None: decided from the data), a multiple of
    `multiple_of` where a kernel needs it (an embedding table's width)."""
    return Field(
        default, ge=low, le=high, multiple_of=multiple_of, strict=True, description=description
    )


def number(default: float, low: float, high: float, description: str, **bounds: Any) -> Any:
    """A finite number within [low, high] (pass gt= / lt= for open ends instead)."""
    limits = bounds or {"ge": low, "le": high}
    return Field(default, strict=True, allow_inf_nan=False, description=description, **limits)


def switch(default: bool, description: str) -> Any:
    """true / false, nothing else."""
    return Field(default, strict=True, description=description)


def described(default: Any, description: str, **kwargs: Any) -> Any:
    """Any other setting, with its description (a dict default is copied per instance)."""
    if isinstance(default, dict):
        return Field(default_factory=dict, description=description, **kwargs)
    return Field(default, description=description, **kwargs)


def one_line(exc: ValidationError, section: str) -> str:
    """A pydantic error as the one line a user reads: `[train] max_epochs: ... (got 'abc')`."""
    parts = []
    for error in exc.errors(include_url=False):
        name = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        got = error.get("input")
        shown = "" if not name or isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{name}: {message}{shown}" if name else message)
    return f"[{section}] " + "; ".join(parts)


def parse_assignment(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value): the value read as a TOML value (so
    numbers, booleans and lists keep their type), else taken as plain text
    (`compute.device=cuda`, `train.event_weights=purchase=1,view=0.1`)."""
    target, sep, raw = text.partition("=")
    section, dot, key = target.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ValueError(f"--set takes SECTION.KEY=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def describe_fields(cls: Any) -> Iterator[tuple[str, str, str, str]]:
    """(name, type, default, description) of every field of a settings section."""
    for field in dataclasses.fields(cls):
        info: Any = field.default
        description = getattr(info, "description", None) or ""
        if getattr(info, "default_factory", None) is not None:
            default = info.default_factory()
        else:
            default = getattr(info, "default", info)
        shown = _shown(default)
        yield field.name, _type_name(field.type), shown, description


def _shown(value: Any) -> str:
    """A default as it is written in a TOML file (unset ones are decided from the data)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if hasattr(value, "value"):  # an enum
        return str(value.value)
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_shown_item(v) for v in value) + "]"
    return str(value)


def _shown_item(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2 and hasattr(value[0], "value"):
        return f"{value[0].value}:{value[1]:g}"  # a weighted loss, as NAME:WEIGHT
    return _shown(value)


_TYPE_NAMES = {"tuple": "list", "dict": "table", "str": "text", "bool": "true/false"}


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "text"
    origin = getattr(annotation, "__origin__", None)
    if origin is Literal:
        return "one of " + ", ".join(map(str, annotation.__args__))
    name = getattr(origin or annotation, "__name__", None)
    if name is None:  # X | None
        parts = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
        return " or ".join(_type_name(a) for a in parts) + " (optional)"
    return _TYPE_NAMES.get(name, name)
