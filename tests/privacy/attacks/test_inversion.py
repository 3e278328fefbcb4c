"""Token inversion from recorded activations: strong on an undefended split, weakened by noise.

Recordings come from splitfed's own runs (HT, labels at the data party, one head block, a tiny
random Llama); the attacker has the public pretrained weights and auxiliary text disjoint from
the victim's examples. Every inversion is reported beside the linear baseline.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM

from splitfed.config import parse_config
from splitfed.privacy.attacks import (
    ATTACKS,
    AttackConfigError,
    AttackContext,
    AttackError,
    build_attack,
    describe_attacks,
    load_observations,
    run_attack,
)
from splitfed.run import train
from tiny import WORDS, run_config, save_tiny_pretrained, tiny_tokenizer, write_topic_csv

HT_LM = {
    "task": "causal_lm",
    "split": {"setting": "ht", "head_layers": 1, "tail_layers": 0, "labels_at": "data"},
    "data": {"name": "local", "task": "causal_lm", "columns": {"text": "sentence"}},
}
#: Optimization budgets that are strong here and keep each test short.
FAST = {"vmi": {"steps": 100}, "ri": {"steps": 100}, "bisr": {}, "bisr-refined": {"refine_steps": 100}}


def _spec(name: str) -> dict[str, Any]:
    return {"name": name.removesuffix("-refined"), **FAST[name]}


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inversion")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    out = {}
    for name, sigma in (("plain", None), ("noisy", 1.0), ("very_noisy", 3.0)):
        defenses = [] if sigma is None else [{"name": "gaussian_mixer", "sigma": sigma}]
        raw = run_config(
            root,
            f"run-{name}",
            train={"steps": 6, "batch_size": 8, "eval_max_new_tokens": 0},
            defenses=defenses,
            **HT_LM,
        )
        raw["data"]["max_eval"] = 8
        train(parse_config(raw), progress=False, log=lambda s: None, record=root / name)
        out[name] = root / name
    out["model"] = root / "model"
    return out


@pytest.fixture(scope="module")
def context(recordings: dict[str, Path]) -> AttackContext:
    rng = random.Random(123)  # the victim's CSV is drawn from another seed: disjoint examples
    aux = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(200)]
    model = AutoModelForCausalLM.from_pretrained(recordings["model"])
    return AttackContext(model=model, tokenizer=tiny_tokenizer(), auxiliary_texts=aux)


@pytest.mark.parametrize("name", list(FAST))
def test_inversion_recovers_the_tokens_of_an_undefended_head(
    recordings: dict[str, Path], context: AttackContext, name: str
) -> None:
    result = run_attack(build_attack(_spec(name)), recordings["plain"], context)
    # measured: every attack 1.00, the linear baseline 1.00, chance 0.165 (one random block is near-invertible)
    assert result.n_examples == 64 and result.chance < 0.25
    assert result.metrics["token_f1"] >= 0.95 and result.metrics["token_accuracy"] >= 0.95
    assert "token_f1" in result.baseline
    assert result.examples and result.examples[0].original == result.examples[0].reconstructed
    assert result.seconds > 0 and result.params


@pytest.mark.parametrize("name", list(FAST))
def test_under_moderate_noise_inversion_beats_the_linear_baseline(
    recordings: dict[str, Path], context: AttackContext, name: str
) -> None:
    result = run_attack(build_attack(_spec(name)), recordings["noisy"], context)
    # measured (sigma 1): vmi 0.95, ri 0.90, bisr 0.97, refined 0.98; linear 0.66; chance 0.165
    assert result.metrics["token_f1"] >= 0.8
    assert result.metrics["token_f1"] >= result.baseline["token_f1"] + 0.15


@pytest.mark.parametrize("name", list(FAST))
def test_strong_noise_defeats_inversion(
    recordings: dict[str, Path], context: AttackContext, name: str
) -> None:
    plain = run_attack(build_attack(_spec(name)), recordings["plain"], context)
    noisy = run_attack(build_attack(_spec(name)), recordings["very_noisy"], context)
    # measured (sigma 3): vmi 0.23, ri 0.18, bisr 0.36, refined 0.34, linear 0.22; chance 0.165
    assert noisy.metrics["token_f1"] <= 0.5
    assert plain.metrics["token_f1"] - noisy.metrics["token_f1"] >= 0.45


def test_the_linear_baseline_is_an_attack_too(recordings: dict[str, Path], context: AttackContext) -> None:
    result = run_attack(build_attack("linear"), recordings["plain"], context)
    assert result.metrics["token_f1"] >= 0.9 and result.baseline == {}


def test_max_examples_limits_what_is_attacked(recordings: dict[str, Path], context: AttackContext) -> None:
    limited = AttackContext(
        model=context.model,
        tokenizer=context.tokenizer,
        auxiliary_texts=context.auxiliary_texts,
        max_examples=10,
    )
    result = run_attack(build_attack("linear"), recordings["plain"], limited)
    assert result.n_examples == 10  # the second batch is cut to fit
    limited.max_examples = None
    result = run_attack(build_attack("linear"), recordings["plain"], limited, phases="eval")
    assert result.n_examples == 16  # two evaluations (before and after training) of 8 sequences


def test_the_last_window_reads_the_end_of_the_run_in_order(recordings: dict[str, Path]) -> None:
    needs = build_attack("linear").needs
    first, _, _ = load_observations(recordings["plain"], needs, phases="train", max_examples=10)
    last, truths, _ = load_observations(
        recordings["plain"], needs, phases="train", max_examples=10, window="last"
    )
    # six training steps of 8 sequences: the first window is steps 1 and 2, the last steps 5 and 6
    assert [o.step for o in first] == [1, 2] and [o.step for o in last] == [5, 6]
    assert sum(t.input_ids.shape[0] for t in truths) == 10
    assert last[0].tensors[("forward", "hidden")].shape[0] == 2  # the batch read last is cut to fit
    with pytest.raises(AttackError, match="window 'middle'"):
        load_observations(recordings["plain"], needs, window="middle")  # type: ignore[arg-type]


def test_an_attack_without_what_it_needs_is_a_clear_error(recordings: dict[str, Path]) -> None:
    with pytest.raises(AttackError, match="public pretrained model"):
        run_attack(build_attack("vmi"), recordings["plain"], AttackContext())
    model = AutoModelForCausalLM.from_pretrained(recordings["model"])
    with pytest.raises(AttackError, match="auxiliary text"):
        run_attack(build_attack("bisr"), recordings["plain"], AttackContext(model=model))
    with pytest.raises(AttackError, match="no recorded batch"):
        run_attack(build_attack("vmi"), recordings["plain"], AttackContext(model=model), clients="nobody")


def test_build_attack_validates_names_and_parameters() -> None:
    assert build_attack({"name": "vmi", "steps": 7}).params()["steps"] == 7
    with pytest.raises(AttackConfigError, match=r"unknown attack 'vim'.*available: bisr, bisr_b, bli"):
        build_attack({"name": "vim"})
    with pytest.raises(AttackConfigError, match=r"vmi: steps: Input should be greater than or equal to 1"):
        build_attack({"name": "vmi", "steps": 0})
    with pytest.raises(AttackConfigError, match=r"ri: tempreature: Extra inputs"):
        build_attack({"name": "ri", "tempreature": 2})
    with pytest.raises(AttackConfigError, match="bli takes no parameters"):
        build_attack({"name": "bli", "steps": 3})
    rows = {name: params for name, _, params in describe_attacks()}
    assert set(rows) == set(ATTACKS)
    assert ("lr", "Adam learning rate (relative to the embeddings' RMS)", 0.05) in rows["vmi"]
