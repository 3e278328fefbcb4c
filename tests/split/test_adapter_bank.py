"""Per-data-party model-party adapters: separate parameters in shared modules."""

from __future__ import annotations

import torch

from splitfed.models.partition import FinetuneSpec, SplitSpec
from splitfed.split.parties import OptimSpec
from splitfed.split.system import build_model_party
from tiny import tiny_model


def _party(per_party: bool):  # type: ignore[no-untyped-def]
    return build_model_party(
        tiny_model("llama", "classification"),
        SplitSpec("ht", 1),
        "classification",
        {"body": FinetuneSpec("lora", r=4)},
        OptimSpec(),
        per_party_adapters=per_party,
    )


def test_each_party_starts_from_the_adapters_loaded_before_its_first_step() -> None:
    party, segments, _ = _party(per_party=True)
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

    # A restarted model party: build, load a checkpoint (the modules get the last active party's
    # adapters, as load_checkpoint's load_adapters writes them), restore the bank.
    fresh, fresh_segments, _ = _party(per_party=True)
    with torch.no_grad():
        for p in fresh_segments["body"].trainable_parameters():
            p.fill_(1.5)
    fresh.load_state_dict(state)
    assert fresh.bank is not None
    assert all(bool((t == 1.5).all()) for t in fresh.bank.named_parameters("a").values())
    fresh.bank.activate("c")  # a new party starts where every party started, not from a's adapters
    assert all(bool((t == 0.5).all()) for t in fresh.bank.named_parameters("c").values())


def test_the_number_of_parties_with_their_own_adapters_is_bounded() -> None:
    import pytest

    from splitfed.split.parties import AdapterBank, ProtocolError

    party, _, _ = _party(per_party=False)
    bank = AdapterBank(party.body, OptimSpec(), max_parties=2)
    bank.activate("a")
    bank.activate("b")
    with pytest.raises(ProtocolError, match="already keeps adapters for 2 data parties"):
        bank.activate("c")
    party.forget_gradients("nobody")  # shared adapters: no copy is made for anyone


def test_final_adapter_directories_differ_for_different_party_ids(tmp_path) -> None:
    from splitfed.runtime import _complete_checkpoints, _safe_name

    ids = ["hospital_a", "hospital/a", "hospital a", "", "..", "anonymous", "own0"]
    names = [_safe_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert _safe_name("own0") == "own0" and all("/" not in n and n not in ("", "..") for n in names)
    (tmp_path / "step-000000004" / "checkpoint").mkdir(parents=True)
    (tmp_path / "step-000000004" / "checkpoint" / "progress.json").write_text("{}")
    (tmp_path / "step-000000006" / ".checkpoint.tmp").mkdir(parents=True)  # killed mid-save
    assert _complete_checkpoints(tmp_path) == [tmp_path / "step-000000004"]
