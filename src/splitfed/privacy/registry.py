"""What the attack and defense registries share: build an entry from a validated spec, describe them all.

A registry is a dict of classes, each with an optional pydantic ``Params`` model of its parameters;
:func:`build_entry` validates a spec ``{name: ..., <params>}`` against it, so a wrong key or value
is an error naming the section, the entry, the key and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import pydantic

T = TypeVar("T")


def build_entry(
    registry: Mapping[str, type[T]],
    spec: Mapping[str, Any],
    *,
    section: str,
    what: str,
    error: type[Exception],
    command: str,
    context: Mapping[str, Any] | None = None,
) -> T:
    """The instance of ``registry[spec["name"]]`` with ``spec``'s other keys as validated parameters.

    Parameters
    ----------
    registry : Mapping[str, type]
    spec : Mapping[str, Any]
        ``{name: ..., <params>}``.
    section : str
        The config section named in errors (``"defenses"``, ``"attacks"``).
    what : str
        What an entry is (``"defense"``), for the unknown-name error.
    error : type[Exception]
        Raised for an unknown name or bad parameters.
    command : str
        The command that lists the entries, named in the unknown-name error.
    context : Mapping[str, Any] | None
        Values (e.g. ``hidden_size``) that fill parameters the class declares and ``spec`` omits.
    """
    params_spec = dict(spec)
    name = params_spec.pop("name", None)
    if name not in registry:
        raise error(
            f"{section}: unknown {what} {name!r}; available: {', '.join(sorted(registry))} "
            f"(`{command}` lists them with their parameters)"
        )
    cls = registry[name]
    params_model: type[pydantic.BaseModel] | None = getattr(cls, "Params", None)
    if params_model is None:
        if params_spec:
            raise error(f"{section}: {name} takes no parameters; got {sorted(params_spec)}")
        return cls()
    fields = params_model.model_fields
    filled = {k: v for k, v in (context or {}).items() if k in fields and k not in params_spec}
    try:
        params = params_model(**(filled | params_spec))
    except pydantic.ValidationError as err:
        problems = "; ".join(
            # An error of the whole entry (a model validator) has no key to name.
            (f"{'.'.join(str(p) for p in e['loc'])}: " if e["loc"] else "")
            + e["msg"].removeprefix("Value error, ")
            for e in err.errors()
        )
        raise error(f"{section}: {name}: {problems}") from None
    return cls(**params.model_dump())


def describe(registry: Mapping[str, type]) -> list[tuple[str, str, list[tuple[str, str, Any]]]]:
    """``(name, summary, [(param, description, default), ...])`` of every entry, by name."""
    rows = []
    for name, cls in sorted(registry.items()):
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        fields: type[pydantic.BaseModel] | None = getattr(cls, "Params", None)
        params = (
            [
                (f, info.description or "", None if info.is_required() else info.default)
                for f, info in fields.model_fields.items()
            ]
            if fields
            else []
        )
        rows.append((name, summary, params))
    return rows
