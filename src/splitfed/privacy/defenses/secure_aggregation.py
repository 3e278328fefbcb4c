"""Secure aggregation as a listed defense: it protects federated runs, so it is set where they aggregate.

Pairwise-mask secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS) and CKKS homomorphic encryption (Cheon, Kim, Kim & Song
2017, "Homomorphic Encryption for Arithmetic of Approximate Numbers", ASIACRYPT) are implemented
as aggregators (:mod:`splitfed.federated.aggregators`) and chosen by ``federated.aggregation`` of
a ``splitfed fedtrain`` config. These entries put them in the defense registry, so that
``splitfed defenses`` lists them next to the data-party defenses, and so that naming one under a
split run's ``defenses:`` fails with where to set it instead.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator

from splitfed.split.front import Defense


class SecureAggregation(Defense):
    """Secure aggregation (Bonawitz et al. 2017): set ``federated.aggregation: secagg`` in a fedtrain config.

    Defends federated runs against attacks on single clients' updates: gradient inversion
    (reconstructing a client's training text from its update, e.g. Zhu et al. 2019, "Deep Leakage
    from Gradients") and membership inference from one update. Each client masks its update with
    pairwise masks that cancel in the sum, so the server, and any minority of clients colluding
    with it, learns only the sum of the round's updates (:mod:`splitfed.federated.aggregators.secagg`).

    It is not a data-party front defense: it acts where a federated round aggregates, not on what
    a split run's data party sends, so building it from a ``defenses:`` list is an error that says
    where to set it (``federated.aggregation`` of ``splitfed fedtrain``; its options under
    ``federated.secagg``).
    """

    name = "secagg"
    #: Where it is set instead (``federated.aggregation`` value).
    aggregation = "secagg"

    class Params(BaseModel):
        """No parameters: validating an entry always fails with where to set it instead."""

        # Any key is accepted so that the error is always the one that says where to set it.
        model_config = ConfigDict(extra="allow")

        @model_validator(mode="after")
        def _not_a_front_defense(self) -> SecureAggregation.Params:
            raise ValueError(_misplaced(SecureAggregation))

    def __init__(self) -> None:
        raise ValueError(_misplaced(type(self)))


class CKKSAggregation(SecureAggregation):
    """Homomorphic aggregation (CKKS, Cheon et al. 2017): set ``federated.aggregation: ckks`` in a fedtrain config.

    Defends federated runs against gradient inversion and membership inference of single updates
    by an honest-but-curious server: clients encrypt their updates and the server adds
    ciphertexts it cannot decrypt (:mod:`splitfed.federated.aggregators.ckks`). Every client
    holds the secret key, so a client colluding with the server can read another's update
    (``secagg`` covers that case). Not a front defense: naming it under a split run's
    ``defenses:`` is an error that says where to set it (options under ``federated.ckks``).
    """

    name = "ckks"
    aggregation = "ckks"

    class Params(BaseModel):
        """No parameters: validating an entry always fails with where to set it instead."""

        # Any key is accepted so that the error is always the one that says where to set it.
        model_config = ConfigDict(extra="allow")

        @model_validator(mode="after")
        def _not_a_front_defense(self) -> CKKSAggregation.Params:
            raise ValueError(_misplaced(CKKSAggregation))


def _misplaced(cls: type[SecureAggregation]) -> str:
    return (
        f"{cls.name} is secure aggregation for federated runs, not a data-party defense of a split "
        f"run; remove it from defenses: and set federated.aggregation: {cls.aggregation} (options under "
        f"federated.{cls.aggregation}) in a `splitfed fedtrain` config"
    )
