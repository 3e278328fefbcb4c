"""Defenses: one module each, one registry line each (``defenses: [{name: ..., ...}]`` in a run's YAML).

A defense is a :class:`~splitfed.split.front.Defense` with a pydantic ``Params`` model of its
parameters; :func:`build_defense` validates a config entry against it, so a wrong key or value is
an error naming the key and what is allowed.
"""

from __future__ import annotations

from typing import Any

from splitfed.privacy.defenses.activation_dp import ActivationDP
from splitfed.privacy.defenses.adversarial import AdversarialTraining
from splitfed.privacy.defenses.custext import CusText
from splitfed.privacy.defenses.dchi_privacy import DChiPrivacy
from splitfed.privacy.defenses.dp_sgd import DPSGD
from splitfed.privacy.defenses.gaussian_mixer import GaussianMixer
from splitfed.privacy.defenses.grad_dp import GradientDP
from splitfed.privacy.defenses.grad_topk import GradientSparsification
from splitfed.privacy.defenses.mid import MID
from splitfed.privacy.defenses.nopeek import NoPeek
from splitfed.privacy.defenses.rantext import RanText
from splitfed.privacy.defenses.santext import SanText
from splitfed.privacy.defenses.secure_aggregation import CKKSAggregation, SecureAggregation
from splitfed.privacy.defenses.snd import SplitAndDenoise
from splitfed.privacy.defenses.textobfuscator import TextObfuscator
from splitfed.privacy.registry import build_entry, describe
from splitfed.split.front import Defense


class DefenseConfigError(ValueError):
    """A ``defenses:`` entry that names no known defense or has bad parameters."""


DEFENSES: dict[str, type[Defense]] = {
    GaussianMixer.name: GaussianMixer,
    SanText.name: SanText,
    CusText.name: CusText,
    RanText.name: RanText,
    SplitAndDenoise.name: SplitAndDenoise,
    TextObfuscator.name: TextObfuscator,
    ActivationDP.name: ActivationDP,
    AdversarialTraining.name: AdversarialTraining,
    DChiPrivacy.name: DChiPrivacy,
    DPSGD.name: DPSGD,
    GradientDP.name: GradientDP,
    GradientSparsification.name: GradientSparsification,
    MID.name: MID,
    NoPeek.name: NoPeek,
    SecureAggregation.name: SecureAggregation,
    CKKSAggregation.name: CKKSAggregation,
}


def build_defense(spec: dict[str, Any], **context: Any) -> Defense:
    """The defense a config entry ``{name: ..., <params>}`` describes.

    ``context`` (e.g. ``hidden_size``) fills parameters the defense declares and the entry omits.

    Raises
    ------
    DefenseConfigError
        For an unknown name, an unknown parameter or a value out of range, naming it.
    """
    return build_entry(
        DEFENSES,
        spec,
        section="defenses",
        what="defense",
        error=DefenseConfigError,
        command="splitfed defenses",
        context=context,
    )


def describe_defenses() -> list[tuple[str, str, list[tuple[str, str, Any]]]]:
    """``(name, summary, [(param, description, default), ...])`` of every registered defense."""
    return describe(DEFENSES)


__all__ = ["DEFENSES", "Defense", "DefenseConfigError", "build_defense", "describe_defenses"]
