"""Defenses: one module each, one registry line each (``defenses: [{name: ..., ...}]`` in a run's YAML).

A defense is a :class:`~splitfed.split.front.Defense` with a pydantic ``Params`` model of its
parameters; :func:`build_defense` validates a config entry against it, so a wrong key or value is
an error naming the key and what is allowed.
"""

from __future__ import annotations

from typing import Any

import pydantic

from splitfed.privacy.defenses.gaussian_mixer import GaussianMixer
from splitfed.split.front import Defense


class DefenseConfigError(ValueError):
    """A ``defenses:`` entry that names no known defense or has bad parameters."""


DEFENSES: dict[str, type[Defense]] = {
    GaussianMixer.name: GaussianMixer,
}


def build_defense(spec: dict[str, Any], **context: Any) -> Defense:
    """The defense a config entry ``{name: ..., <params>}`` describes.

    ``context`` (e.g. ``hidden_size``) fills parameters the defense declares and the entry omits.
    """
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in DEFENSES:
        raise DefenseConfigError(
            f"defenses: unknown defense {name!r}; available: {', '.join(sorted(DEFENSES))} "
            "(`splitfed defenses` lists them with their parameters)"
        )
    cls = DEFENSES[name]
    params_model = getattr(cls, "Params", None)
    if params_model is None:
        if spec:
            raise DefenseConfigError(f"defenses: {name} takes no parameters; got {sorted(spec)}")
        return cls()
    fields = params_model.model_fields
    spec = {k: v for k, v in context.items() if k in fields and k not in spec} | spec
    try:
        params = params_model(**spec)
    except pydantic.ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or name}: {e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        )
        raise DefenseConfigError(f"defenses: {name}: {problems}") from None
    return cls(**params.model_dump())  # type: ignore[call-arg]


def describe_defenses() -> list[tuple[str, str, list[tuple[str, str, Any]]]]:
    """``(name, summary, [(param, description, default), ...])`` of every registered defense."""
    rows = []
    for name, cls in sorted(DEFENSES.items()):
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        fields = getattr(cls, "Params", None)
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


__all__ = ["DEFENSES", "Defense", "DefenseConfigError", "build_defense", "describe_defenses"]
