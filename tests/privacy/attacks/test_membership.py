"""Membership inference on a tiny causal LM overfitted to 16 sentences: the loss attack separates
members from held-out sentences, reference calibration does at least about as well, and on the
un-fine-tuned model the attacks are at chance."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from splitfed.data.tasks import get_task
from splitfed.federated.simulation import whole_model
from splitfed.federated.strategies import FitConfig
from splitfed.models.partition import FinetuneSpec
from splitfed.privacy.attacks.membership import (
    membership_scores,
    run_membership,
    train_reference,
)
from splitfed.privacy.attacks.metrics import tpr_at_fpr
from tiny import WORDS, tiny_model, tiny_tokenizer

LORA = FinetuneSpec("lora", 8, 16, 0.0, None)
FIT = FitConfig(
    local_steps=60,
    local_epochs=None,
    batch_size=8,
    optimizer="adamw",
    lr=1e-2,
    weight_decay=0.0,
    max_grad_norm=1.0,
)


def _sentences(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 8)))} for _ in range(n)]


@pytest.fixture(scope="module")
def setup() -> dict:
    task = get_task("causal_lm", tokenizer=tiny_tokenizer(), max_length=16, num_labels=None)
    members, non_members, aux = _sentences(16, 1), _sentences(32, 2), _sentences(16, 3)
    target = train_reference(
        tiny_model("llama", "causal_lm"), members, task, head="causal_lm", finetune=LORA, fit=FIT, seed=0
    )
    refs = [
        train_reference(
            tiny_model("llama", "causal_lm"), aux, task, head="causal_lm", finetune=LORA, fit=FIT, seed=k
        )
        for k in (1, 2)
    ]
    return {"task": task, "members": members, "non_members": non_members, "target": target, "refs": refs}


def test_overfitted_members_are_detected_by_loss_and_by_reference_models(setup: dict) -> None:
    result = run_membership(
        setup["target"], setup["refs"], setup["members"], setup["non_members"], setup["task"]
    )
    m = result.metrics
    print({k: round(v, 3) for k, v in m.items()})
    assert m["member_loss"] < m["non_member_loss"]
    assert m["loss_auc"] >= 0.8
    assert m["reference_auc"] >= m["loss_auc"] - 0.05
    assert m["lira_auc"] >= m["loss_auc"] - 0.05
    assert m["loss_tpr@0.1fpr"] > 0.1  # better than a guess at the low-FPR point
    assert result.n_examples == 48 and result.params["references"] == 2


def test_the_untuned_model_leaves_membership_at_chance(setup: dict) -> None:
    base = whole_model(tiny_model("llama", "causal_lm"), "causal_lm")
    ref = whole_model(tiny_model("llama", "causal_lm", seed=1), "causal_lm")
    result = run_membership(base, [ref], setup["members"], setup["non_members"], setup["task"])
    print({k: round(v, 3) for k, v in result.metrics.items()})
    for name in ("loss", "reference", "lira"):
        assert abs(result.metrics[f"{name}_auc"] - 0.5) <= 0.15, name


def test_scores_rank_by_calibrated_loss() -> None:
    target = torch.tensor([1.0, 2.0, 3.0])
    refs = torch.tensor([[1.5, 1.0, 5.0], [1.5, 1.2, 5.2]])
    scores = membership_scores(target, refs)
    assert scores["loss"].argmax() == 0
    assert scores["reference"].argmax() == 2  # the hardest example fits the target best
    assert scores["lira"].argmax() == 2


def test_tpr_at_fpr_reads_the_low_fpr_end() -> None:
    labels = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    scores = torch.tensor([9.0, 8.0, 1.0, 0.5, 7.0, 2.0, 0.2, 0.1])
    assert tpr_at_fpr(scores, labels, 0.0) == 0.5  # above 7: two of four members, no non-member
    assert tpr_at_fpr(scores, labels, 0.25) == 0.5
    assert tpr_at_fpr(scores, labels, 0.5) == 1.0  # above 0.2: every member, non-members 7 and 2
    assert tpr_at_fpr(scores, labels, 1.0) == 1.0


def test_a_finished_split_run_is_attacked_from_its_output_dir(tmp_path: Path) -> None:
    from splitfed.config import parse_config
    from splitfed.privacy.attacks.membership import membership_from_run
    from splitfed.run import train
    from tiny import run_config, save_tiny_pretrained

    save_tiny_pretrained(tmp_path / "model")
    rng = random.Random(0)
    lines = ["sentence"] + [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 8))) for _ in range(80)]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    raw = run_config(
        tmp_path,
        "lm",
        task="causal_lm",
        data={
            "name": "local",
            "task": "causal_lm",
            "columns": {"text": "sentence"},
            "max_train": 16,
            "max_eval": 16,
        },
        train={"steps": 60, "lr": 1e-2, "batch_size": 8, "eval_before": False, "eval_max_new_tokens": 0},
    )
    result = train(parse_config(raw), progress=False, log=lambda s: None)
    attack = membership_from_run(result.output_dir, references=1)
    print({k: round(v, 3) for k, v in attack.metrics.items()})
    assert attack.metrics["loss_auc"] >= 0.8
    assert attack.metrics["reference_auc"] >= attack.metrics["loss_auc"] - 0.1
    from typer.testing import CliRunner

    from splitfed.cli import app

    cli = CliRunner().invoke(app, ["membership", str(result.output_dir), "--references", "0"])
    assert cli.exit_code == 0, cli.output
    assert "loss_auc" in cli.output
    missing = CliRunner().invoke(app, ["membership", str(tmp_path / "nowhere")])
    assert missing.exit_code != 0 and "error:" in missing.output
