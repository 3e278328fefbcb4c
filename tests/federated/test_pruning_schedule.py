"""FedShield-LLM's pruning schedule in `splitfed fedtrain`: the schedule's values, per-client masks
(zeros in the dense update), the shared mask (only kept values sent, fewer bytes and ciphertexts,
the aggregate equal to the average of the masked deltas) and the configuration's errors."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from flower_grid import LocalGrid
from splitfed.config import ConfigError, parse_config
from splitfed.federated.aggregators import SharedMask, prune
from splitfed.federated.aggregators.pruning import kept_count, prune_ratio, topk_masks
from splitfed.federated.flower.server_app import FlowerServer
from splitfed.federated.simulation import ClientResult, FederatedSimulation, fedtrain
from splitfed.run import prepare
from tiny import run_config, save_tiny_pretrained, write_topic_csv

FED = {"clients": 3, "rounds": 3, "local_steps": 2, "sample_fraction": 1.0, "partition": "iid"}
#: Round 1 unpruned, rounds 2 and 3 with half of the values zeroed.
HALF = {"start_round": 2, "start_ratio": 0.5, "end_ratio": 0.5}
#: 2048 slots per ciphertext: the tiny model's 3,680 values (+17 weights) need 2, half of them 1.
SMALL_CKKS = {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [49, 60], "scale_bits": 30}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fedprune")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    return root


def _sim(root: Path, **fed: object) -> FederatedSimulation:
    cfg = parse_config(run_config(root, "sim", federated=FED | fed))
    return FederatedSimulation(prepare(cfg, log=lambda s: None), log=lambda s: None)


def _capture(sim: FederatedSimulation) -> dict[int, ClientResult]:
    """Record every client result of the next rounds (by client index, the latest round's)."""
    seen: dict[int, ClientResult] = {}
    original = sim.client_update

    def recording(round_id, index, fit):  # type: ignore[no-untyped-def]
        seen[index] = original(round_id, index, fit)
        return seen[index]

    sim.client_update = recording  # type: ignore[method-assign]
    return seen


def test_schedule_is_zero_before_the_start_then_linear_to_the_end_ratio() -> None:
    kw = {"start_round": 3, "start_ratio": 0.2, "end_ratio": 0.8}
    ratios = [prune_ratio(t, 10, **kw) for t in range(1, 11)]  # type: ignore[arg-type]
    assert ratios[:2] == [0.0, 0.0]
    assert ratios[2] == pytest.approx(0.2) and ratios[-1] == pytest.approx(0.8)
    assert ratios[5] == pytest.approx(0.2 + 0.6 * 3 / 7)
    assert all(b > a for a, b in itertools.pairwise(ratios[2:]))
    assert prune_ratio(5, 5, start_round=5, start_ratio=0.1, end_ratio=0.6) == 0.6  # one pruned round
    assert prune_ratio(4, 5, start_round=1, start_ratio=0.3, end_ratio=0.3) == 0.3  # constant
    with pytest.raises(ValueError, match="start_ratio <= end_ratio"):
        prune_ratio(1, 5, start_round=1, start_ratio=0.5, end_ratio=0.4)
    with pytest.raises(ValueError, match="start_round <= rounds"):
        prune_ratio(1, 5, start_round=6, start_ratio=0.1, end_ratio=0.4)


def test_per_tensor_masks_keep_each_tensors_share() -> None:
    tensors = {"a": torch.tensor([10.0, 20.0, 30.0, 40.0]), "b": torch.tensor([0.1, 0.3, 0.2, 0.0])}
    together = topk_masks(tensors, 0.5)
    assert together["a"].all() and not together["b"].any()  # a's values crowd out all of b
    each = topk_masks(tensors, 0.5, per_tensor=True)
    assert each["a"].tolist() == [False, False, True, True]
    assert each["b"].tolist() == [False, True, True, False]
    mask = SharedMask(each)
    assert torch.equal(mask.apply(tensors)["b"], torch.tensor([0.0, 0.3, 0.2, 0.0]))


def test_per_client_pruning_zeros_all_but_each_deltas_largest_values(root: Path) -> None:
    sim = _sim(root, pruning={"mode": "per_client", **HALF})
    seen = _capture(sim)
    first = sim.run_round(1)
    assert first["prune_ratio"] == 0.0 and first["kept_values"] == sim.layout.numel
    assert all(torch.equal(r.delta[n], r.update.delta[n]) for r in seen.values() for n in r.delta)
    record = sim.run_round(2)
    numel, kept = sim.layout.numel, kept_count(sim.layout.numel, 0.5)
    assert record["prune_ratio"] == 0.5 and record["kept_values"] == kept
    for result in seen.values():
        nonzero = sum(int((t != 0).sum()) for t in result.delta.values())
        assert nonzero <= kept and numel - nonzero >= numel // 2
        raw = result.update.delta
        assert sum(int((t != 0).sum()) for t in raw.values()) > kept  # pruning did remove values
        expected = prune(raw, keep_ratio=0.5)
        assert all(torch.equal(result.delta[n], expected[n]) for n in raw)
        # the kept values are the largest: every zeroed one is at most the smallest kept one
        kept_min = min(float(t[t != 0].abs().min()) for t in result.delta.values() if (t != 0).any())
        dropped = torch.cat([raw[n][result.delta[n] == 0].abs().reshape(-1) for n in raw])
        assert float(dropped.max()) <= kept_min
    assert record["update_bytes"] == first["update_bytes"]  # dense: the zeros still travel


@dataclass
class SharedRun:
    """Rounds 1 (unpruned) and 2 (half pruned by the shared mask) of one aggregation."""

    sim: FederatedSimulation
    records: list[dict]
    before: dict[str, torch.Tensor]  # the global adapters after round 1
    results: dict[int, ClientResult]  # round 2's clients


@pytest.fixture(scope="module")
def shared(root: Path) -> dict[str, SharedRun]:
    runs = {}
    for aggregation, extra in (
        ("plain", {}),
        ("ckks", {"ckks": SMALL_CKKS}),
        ("secagg", {"secagg": {"rounding": "nearest"}}),
    ):
        sim = _sim(root, aggregation=aggregation, pruning={"mode": "shared", **HALF}, **extra)
        seen = _capture(sim)
        first = sim.run_round(1)
        before = {n: t.clone() for n, t in sim.global_state.items()}
        runs[aggregation] = SharedRun(sim, [first, sim.run_round(2)], before, dict(seen))
    return runs


def test_shared_mask_aggregate_is_the_average_of_the_masked_deltas(shared: dict[str, SharedRun]) -> None:
    run = shared["plain"]
    sim, x0, results = run.sim, run.before, run.results.values()
    mask = sim.shared_mask(2)
    assert mask is not None and mask.kept == sum(kept_count(t.numel(), 0.5) for t in x0.values())
    assert run.records[1]["prune_ratio"] == 0.5 and run.records[1]["kept_values"] == mask.kept
    total = sum(r.weight for r in results)
    for n, x in x0.items():
        average = sum(r.weight * mask.apply(r.update.delta)[n].double() for r in results) / total
        assert torch.allclose(sim.global_state[n].double(), x.double() + average, atol=1e-7), n
        # pruned coordinates of the global adapters did not move
        assert torch.equal(sim.global_state[n][~mask.masks[n]], x[~mask.masks[n]]), n
        assert mask.masks[n].any(), n  # ranked per tensor: every LoRA B keeps values too
    assert all(torch.equal(r.delta[n], mask.apply(r.update.delta)[n]) for r in results for n in x0)


def test_shared_mask_shrinks_each_clients_bytes_by_the_keep_ratio(shared: dict[str, SharedRun]) -> None:
    for aggregation in ("plain", "ckks"):
        sim, (full, pruned) = shared[aggregation].sim, shared[aggregation].records
        ratio = pruned["update_bytes"] / full["update_bytes"]
        mask = sim.shared_mask(2)
        assert mask is not None
        if aggregation == "plain":
            assert ratio == pytest.approx(mask.layout(sim.layout).width / sim.layout.width, rel=0.02)
            assert ratio == pytest.approx(0.5, abs=0.03)
        else:
            slots = SMALL_CKKS["poly_modulus_degree"] // 2
            ciphertexts = [math.ceil(lay.width / slots) for lay in (sim.layout, mask.layout(sim.layout))]
            assert ciphertexts == [2, 1]
            assert ratio == pytest.approx(0.5, abs=0.05)
        assert pruned["bytes_up"] < full["bytes_up"]


def test_shared_mask_under_ckks_and_secagg_gives_plains_adapters(shared: dict[str, SharedRun]) -> None:
    for n, ref in shared["plain"].sim.global_state.items():
        assert torch.allclose(shared["ckks"].sim.global_state[n], ref, atol=1e-5), n
        assert torch.allclose(shared["secagg"].sim.global_state[n], ref, atol=1e-5), n


def test_shared_mask_under_dp_clips_only_the_kept_values(root: Path) -> None:
    sim = _sim(root, pruning={"mode": "shared", **HALF}, dp={"clip": 1e-3, "noise_multiplier": 0.0})
    seen = _capture(sim)
    sim.run_round(1)
    sim.run_round(2)
    mask = sim.shared_mask(2)
    assert mask is not None
    for result in seen.values():
        assert all(not result.delta[n][~mask.masks[n]].any() for n in result.delta)
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in result.delta.values()))
        assert norm == pytest.approx(1e-3, rel=1e-4) and result.weight == 1.0


def test_fedtrain_reports_the_schedule_and_its_bytes(root: Path) -> None:
    raw = run_config(root, "pruned", federated=FED | {"pruning": {"mode": "shared", **HALF}})
    raw["train"] = raw["train"] | {"eval_before": False}
    result = fedtrain(parse_config(raw), progress=False, log=lambda s: None)
    summary = json.loads((result.output_dir / "results.json").read_text())
    assert summary["pruning"] == {"mode": "shared", **HALF}
    assert [h["prune_ratio"] for h in summary["history"]] == [0.0, 0.5, 0.5]
    sizes = [h["update_bytes"] for h in summary["history"]]
    assert sizes[1] == sizes[2] < 0.6 * sizes[0]


@pytest.mark.parametrize(
    ("pruning", "fed", "message"),
    [
        (
            {"mode": "shared", "start_ratio": 0.6, "end_ratio": 0.4},
            {},
            "end_ratio=0.4 is below start_ratio=0.6",
        ),
        ({"mode": "per_client", "start_round": 5, "end_ratio": 0.5}, {"rounds": 3}, "start_round=5 is after"),
        ({"mode": "shared", "start_round": 1, "end_ratio": 0.5}, {}, "set start_round >= 2"),
        ({"mode": "per_client", "end_ratio": 1.0}, {}, "federated.pruning.end_ratio"),
        ({"mode": "per_client", "start_round": 0, "end_ratio": 0.5}, {}, "federated.pruning.start_round"),
        ({"mode": "random", "end_ratio": 0.5}, {}, "federated.pruning.mode"),
        ({"mode": "shared"}, {}, "federated.pruning.end_ratio"),
    ],
)
def test_bad_pruning_settings_are_errors_that_say_how_to_fix_them(
    pruning: dict, fed: dict, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"federated": {"pruning": pruning, **fed}})
    assert message in str(err.value) and "Value error" not in str(err.value)


def test_per_client_pruning_at_round_one_is_allowed() -> None:
    fed = parse_config({"federated": {"pruning": {"mode": "per_client", "start_round": 1, "end_ratio": 0.5}}})
    assert fed.federated is not None and fed.federated.pruning is not None
    assert fed.federated.pruning.start_ratio == 0.0


def test_flower_refuses_pruning(root: Path) -> None:
    cfg = parse_config(
        run_config(root, "x", federated=FED | {"aggregation": "ckks", "pruning": {"mode": "shared", **HALF}})
        | {"split": {"setting": "ht", "head_layers": 1}}
    )
    with pytest.raises(ConfigError, match="not yet on Flower"):
        FlowerServer(LocalGrid([], {}), cfg)
