"""A defense's state beyond its parameters travels with the data party's checkpoint (exact --resume)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from splitfed.split.system import SplitSystem
from tiny import tiny_batch


@pytest.mark.parametrize(
    ("spec", "attribute"),
    [
        ({"name": "adversarial", "weight": 0.5}, "inverter"),
        ({"name": "grad_topk", "fraction": 0.2}, "residual"),
    ],
    ids=["adversarial", "grad_topk"],
)
def test_a_defense_s_state_survives_the_data_party_s_checkpoint(
    split_system: Callable[..., SplitSystem], spec: dict, attribute: str
) -> None:
    trained = split_system([spec])
    batch = tiny_batch("classification")
    for _ in range(2):
        trained.data_party.train_step(batch)
    state = trained.data_party.state_dict()
    restored = split_system([spec])
    restored.data_party.load_state_dict(state)
    before, after = trained.data_party.front.defenses[0], restored.data_party.front.defenses[0]
    if attribute == "inverter":
        for a, b in zip(before.inverter.parameters(), after.inverter.parameters(), strict=True):  # type: ignore[union-attr]
            assert torch.equal(a, b)
        assert after.losses == before.losses  # type: ignore[attr-defined]
        assert after.optimizer.state_dict()["state"]  # type: ignore[attr-defined]  # Adam's moments too
    else:
        assert before.residual is not None and torch.equal(after.residual, before.residual)  # type: ignore[attr-defined]
