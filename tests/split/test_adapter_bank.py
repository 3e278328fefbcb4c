"""Per-data-party model-party adapters: separate parameters in shared modules."""

from __future__ import annotations

import torch

from splitfed.models.partition import FinetuneSpec, SplitSpec
from splitfed.split.parties import OptimSpec
from splitfed.split.system import build_model_party
from tiny import tiny_model


def test_each_party_starts_from_the_adapters_loaded_before_its_first_step() -> None:
    model = tiny_model("llama", "classification")
    party, segments, _ = build_model_party(
        model,
        SplitSpec("ht", 1),
        "classification",
        {"body": FinetuneSpec("lora", r=4)},
        OptimSpec(),
        per_party_adapters=True,
    )
    assert party.bank is not None
    loaded = segments["body"].named_model_parameters(trainable_only=True)
    with torch.no_grad():
        for p in loaded.values():
            p.fill_(0.5)  # as `serve --adapters DIR` loads them after the party is built
    party.bank.activate("a")
    own_a = party.bank.named_parameters("a")
    assert set(own_a) == set(loaded)
    assert all(bool((t == 0.5).all()) for t in own_a.values())
    with torch.no_grad():
        for p in segments["body"].trainable_parameters():
            p.add_(1.0)  # trains a's copy, which is what the modules hold now
    party.bank.activate("b")
    assert all(bool((t == 0.5).all()) for t in party.bank.named_parameters("b").values())
    assert all(bool((t == 1.5).all()) for t in party.bank.named_parameters("a").values())
    state = party.state_dict()
    party.bank.load_state_dict({})
    party.load_state_dict(state)
    assert all(bool((t == 1.5).all()) for t in party.bank.named_parameters("a").values())
