"""Every trainable defense trains on a frozen head (SplitFrozen) and travels in the run's adapter file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from splitfed.config import parse_config
from splitfed.run import load_adapters, train
from splitfed.run.callbacks import Callback, LoopState
from splitfed.split.front import build_front
from splitfed.split.system import build_split
from tiny import run_config, save_tiny_pretrained, simple_loss, tiny_model, write_topic_csv

HIDDEN = 32
#: The defenses with parameters of their own (they join the data party's optimizer).
TRAINABLE: dict[str, dict[str, Any]] = {
    "mid": {"name": "mid", "bottleneck": 8, "where": "both"},
    "snd": {"name": "snd", "epsilon": 50.0},  # its denoiser sits before the tail: HBT
    "gaussian_mixer": {"name": "gaussian_mixer", "sigma": 0.1},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trainable")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    return root


class _TrainedFront(Callback):
    """Keeps the front's parameters at the end of the run, and whether the head trained."""

    def __init__(self) -> None:
        self.params: dict[str, torch.Tensor] = {}
        self.head_trains: bool | None = None

    def on_end(self, state: LoopState) -> None:
        front = state.data_party.front
        self.params = {n: p.detach().clone() for n, p in front.named_model_parameters().items()}
        self.head_trains = state.data_party.head.is_trainable


@pytest.mark.parametrize("name", list(TRAINABLE))
def test_a_trainable_defense_trains_on_a_frozen_head_and_reloads_from_the_adapters(
    workspace: Path, name: str
) -> None:
    spec = TRAINABLE[name]
    raw = run_config(workspace, name, mode="splitfrozen", defenses=[spec])
    raw["model"]["num_labels"] = 3
    raw["train"] |= {"steps": 2, "eval_before": False}
    cfg = parse_config(raw)
    initial = {
        n: p.detach().clone()
        for n, p in build_front(cfg.defenses, hidden_size=HIDDEN, seed=cfg.train.seed)
        .named_model_parameters()
        .items()
    }
    kept = _TrainedFront()
    result = train(cfg, progress=False, log=lambda s: None, callbacks=[kept])
    assert kept.head_trains is False  # SplitFrozen: only the defense (and the tail's LoRA) train here
    assert set(kept.params) == set(initial) and initial
    assert any(not torch.equal(kept.params[n], initial[n]) for n in initial), "the defense did not train"

    saved = load_file(str(result.output_dir / "data_party" / "adapter.safetensors"))
    front_keys = {k for k in saved if k.startswith("front.")}
    assert front_keys == set(kept.params)
    for key in front_keys:
        torch.testing.assert_close(saved[key], kept.params[key], atol=0, rtol=0)

    # A fresh front (another seed: other initial values) loads them back.
    model = tiny_model("llama", "classification", seed=1)
    fresh = build_front(cfg.defenses, model, seed=1)
    assert any(not torch.equal(p, kept.params[n]) for n, p in fresh.named_model_parameters().items())
    system = build_split(
        model, cfg.split.spec(), cfg.head, cfg.segment_finetune(), simple_loss("classification"), front=fresh
    )
    load_adapters(system.segments, result.output_dir, ("data_party",))
    for key, value in fresh.named_model_parameters().items():
        torch.testing.assert_close(value.detach(), kept.params[key], atol=0, rtol=0)


def test_textobfuscator_has_no_trainable_parameters() -> None:
    """Its cluster centers are buffers recomputed from the public model, so it has nothing to save."""
    front = build_front([{"name": "textobfuscator", "n_clusters": 4}], tiny_model("llama", "classification"))
    assert not front.trains and not front.named_model_parameters()
