"""Typed configuration: YAML files in ``configs/``, environment overrides, CLI flags.

Each process declares one pydantic model whose fields are sections (one per concern). Every
field has a default, a docstring (``Field(description=...)``) and its unit in its name.
:func:`load_config` reads the YAML, applies ``PREFIX__SECTION__FIELD=value`` environment
overrides, then flag overrides, and validates once. A bad value fails at start with
:class:`ConfigError`, naming the field and the value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, TypeVar

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict

T = TypeVar("T", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def _format_validation_error(e: pydantic.ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {field} = {err.get('input')!r}: {err['msg']}")
    return "\n".join(lines)


def load_config(
    cls: type[T],
    path: str | os.PathLike[str] | None = None,
    *,
    env_prefix: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Load ``cls`` from YAML at ``path``, then env overrides, then dotted ``overrides``.

    Env: ``{env_prefix}__SECTION__FIELD=value`` (value parsed as YAML, so ``8``, ``true`` and
    ``[a, b]`` work). Overrides: ``{"server.port": 8001}``; ``None`` values are skipped.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded
        source = str(p)
    env = os.environ if environ is None else environ
    if env_prefix:
        head = env_prefix + "__"
        for key, raw in env.items():
            if key.startswith(head):
                keys = [k.lower() for k in key[len(head):].split("__") if k]
                if keys:
                    _set_path(data, keys, yaml.safe_load(raw) if raw != "" else "")
                    source += f" + ${key}"
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(data, dotted.split("."), value)
    try:
        return cls.model_validate(data)
    except pydantic.ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
