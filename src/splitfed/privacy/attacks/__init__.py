"""Attacks on what crosses the split: one module each, one registry line each.

An attack (:class:`~splitfed.privacy.attacks.base.Attack`) declares what it reads from a
recording and what public knowledge it needs; :func:`~splitfed.privacy.attacks.runner.run_attack`
runs it on a recording and scores it against the data party's ground truth. :func:`build_attack`
validates a spec ``{name: ..., <params>}`` against the attack's pydantic ``Params``, so a wrong key
or value is an error naming the key and what is allowed.
"""

from __future__ import annotations

from typing import Any

from splitfed.privacy.attacks.base import (
    Attack,
    AttackContext,
    AttackError,
    AttackResult,
    Need,
    Observation,
    Reconstruction,
)
from splitfed.privacy.attacks.bisr import LearnedInversion
from splitfed.privacy.attacks.bisr_backward import BackwardInversion
from splitfed.privacy.attacks.control import noise_observations, noise_update
from splitfed.privacy.attacks.label_inference import (
    BatchLabelInference,
    DirectionScoring,
    NormScoring,
)
from splitfed.privacy.attacks.linear_baseline import LinearBaseline
from splitfed.privacy.attacks.model_completion import ModelCompletion
from splitfed.privacy.attacks.relaxation import RelaxationInversion
from splitfed.privacy.attacks.runner import (
    load_generations,
    load_observations,
    run_attack,
    run_generation_attack,
)
from splitfed.privacy.attacks.vmi import WhiteBoxInversion
from splitfed.privacy.registry import build_entry, describe


class AttackConfigError(ValueError):
    """An attack spec that names no known attack or has bad parameters."""


ATTACKS: dict[str, type[Attack]] = {
    LinearBaseline.name: LinearBaseline,
    WhiteBoxInversion.name: WhiteBoxInversion,
    RelaxationInversion.name: RelaxationInversion,
    LearnedInversion.name: LearnedInversion,
    BackwardInversion.name: BackwardInversion,
    NormScoring.name: NormScoring,
    DirectionScoring.name: DirectionScoring,
    BatchLabelInference.name: BatchLabelInference,
    ModelCompletion.name: ModelCompletion,
}


def build_attack(spec: dict[str, Any] | str) -> Attack:
    """The attack a spec ``{name: ..., <params>}`` (or just its name) describes.

    Raises
    ------
    AttackConfigError
        For an unknown name, an unknown parameter or a value out of range, naming it.
    """
    return build_entry(
        ATTACKS,
        {"name": spec} if isinstance(spec, str) else spec,
        section="attacks",
        what="attack",
        error=AttackConfigError,
        command="splitfed attacks",
    )


def describe_attacks() -> list[tuple[str, str, list[tuple[str, str, Any]]]]:
    """``(name, summary, [(param, description, default), ...])`` of every registered attack."""
    return describe(ATTACKS)


__all__ = [
    "ATTACKS",
    "Attack",
    "AttackConfigError",
    "AttackContext",
    "AttackError",
    "AttackResult",
    "BackwardInversion",
    "BatchLabelInference",
    "DirectionScoring",
    "LearnedInversion",
    "LinearBaseline",
    "ModelCompletion",
    "Need",
    "NormScoring",
    "Observation",
    "Reconstruction",
    "RelaxationInversion",
    "WhiteBoxInversion",
    "build_attack",
    "describe_attacks",
    "load_generations",
    "load_observations",
    "noise_observations",
    "noise_update",
    "run_attack",
    "run_generation_attack",
]
