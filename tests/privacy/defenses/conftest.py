"""A tiny in-process split system with a front of defenses, for the defenses' tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from splitfed.models.partition import FinetuneSpec, SplitSpec
from splitfed.split.front import build_front
from splitfed.split.parties import OptimSpec
from splitfed.split.system import SplitSystem, build_split
from tiny import simple_loss, tiny_model

SPECS = {"ht": SplitSpec("ht", 1), "hbt": SplitSpec("hbt", 1, 1)}


def _build(
    defenses: Sequence[dict[str, Any]],
    *,
    setting: str = "hbt",
    head_mode: str = "lora",
    task: str = "classification",
    lr: float = 1e-2,
    seed: int = 0,
) -> SplitSystem:
    model = tiny_model("llama", task, seed=seed)
    front = build_front(defenses, model, seed)  # validates through the registry and runs setup()
    finetune = {
        "head": FinetuneSpec(head_mode, r=2),  # type: ignore[arg-type]
        "body": FinetuneSpec("lora", r=2),
        "tail": FinetuneSpec("lora", r=2),
    }
    return build_split(
        model, SPECS[setting], task, finetune, simple_loss(task), OptimSpec(lr=lr), front=front
    )


@pytest.fixture
def split_system() -> Callable[..., SplitSystem]:
    """``split_system(defenses, setting=..., head_mode=..., task=..., lr=...)``: a tiny llama split."""
    return _build
