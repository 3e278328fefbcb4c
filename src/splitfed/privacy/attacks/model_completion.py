"""Model completion: the model party trains its own task head over the body outputs it sends (HBT).

Fu et al., "Label Inference Attacks Against Vertical Federated Learning" (USENIX Security 2022),
passive model completion: the party without labels holds a trained bottom model and completes it
with a small top model fit on a few labelled auxiliary examples. In HBT the model party's body
output (``forward_result.hidden``, sent to the data party's private tail) is that representation;
fine-tuning makes it task-aware, so a small classifier over it, trained on the few examples per
class whose labels the attacker knows (drawn by the runner and not scored), labels every other
example of the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from splitfed.models.families import last_token_index
from splitfed.privacy.attacks.base import Attack, AttackContext, AttackError, Need, Observation
from splitfed.privacy.attacks.metrics import IGNORE


def pooled_features(observation: Observation) -> torch.Tensor:
    """One feature vector per example: the body output at its last real position and its mean over
    real positions, concatenated (a decoder's classification head pools the last position)."""
    hidden = observation["forward_result", "hidden"].float()
    mask = observation["forward", "attention_mask"].to(hidden.device)
    last = hidden[torch.arange(hidden.shape[0]), last_token_index(mask)]
    weight = mask.float().unsqueeze(-1)
    mean = (hidden * weight).sum(1) / weight.sum(1).clamp(min=1.0)
    return torch.cat([last, mean], dim=-1)


class ModelCompletion(Attack):
    """Label every example with a classifier trained on the intercepted body outputs of a few known ones.

    Parameters
    ----------
    known_per_class : int, default 5
        Examples per class whose labels the attacker knows (its auxiliary labelled data; not scored).
    hidden : int, default 0
        Width of the classifier's hidden layer; 0: a linear (softmax regression) classifier.
    steps : int, default 300
        Full-batch AdamW steps.
    lr : float, default 1e-2
    weight_decay : float, default 1e-2
    """

    name = "model_completion"
    target = "labels"
    sequence_labels = True
    needs = (Need("forward_result", "hidden"), Need("forward", "attention_mask"))

    class Params(BaseModel):
        """Parameters of :class:`ModelCompletion`."""

        model_config = ConfigDict(extra="forbid")
        known_per_class: int = Field(5, ge=1, le=100_000, description="known labels per class (not scored)")
        hidden: int = Field(0, ge=0, le=65_536, description="classifier hidden width (0: linear)")
        steps: int = Field(300, ge=1, le=100_000, description="full-batch AdamW steps")
        lr: float = Field(1e-2, gt=0.0, le=10.0, description="AdamW learning rate")
        weight_decay: float = Field(1e-2, ge=0.0, le=100.0, description="AdamW weight decay")

    def __init__(
        self,
        known_per_class: int = 5,
        hidden: int = 0,
        steps: int = 300,
        lr: float = 1e-2,
        weight_decay: float = 1e-2,
    ) -> None:
        self.known_per_class, self.hidden, self.steps = known_per_class, hidden, steps
        self.lr, self.weight_decay = lr, weight_decay

    def run(
        self,
        observations: Sequence[Observation],
        context: AttackContext,
        known: Mapping[int, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Fit the classifier on the known examples' features, then label every example."""
        features = [pooled_features(o) for o in observations]
        train_x, train_y = [], []
        for index, labels in (known or {}).items():
            keep = labels != IGNORE
            train_x.append(features[index][keep])
            train_y.append(labels[keep].long())
        if not train_x or not sum(len(y) for y in train_y):
            raise AttackError(
                f"attack {self.name!r} needs a few examples whose labels the attacker knows "
                "(known_per_class >= 1, and labels in the ground truth)"
            )
        x, y = torch.cat(train_x), torch.cat(train_y)
        classes = sorted(set(y.tolist()))
        index_of = {c: i for i, c in enumerate(classes)}
        target = torch.tensor([index_of[int(c)] for c in y])
        # Standardized on every intercepted example (the attacker sees them all, labelled or not).
        everything = torch.cat(features)
        mean, std = everything.mean(0), everything.std(0).clamp(min=1e-6)
        torch.manual_seed(context.seed)
        width = x.shape[-1]
        model: nn.Module = (
            nn.Linear(width, len(classes))
            if self.hidden == 0
            else nn.Sequential(nn.Linear(width, self.hidden), nn.GELU(), nn.Linear(self.hidden, len(classes)))
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        inputs = (x - mean) / std
        for _ in range(self.steps):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(inputs), target).backward()
            optimizer.step()
        lookup = torch.tensor(classes)
        with torch.no_grad():
            return [lookup[model((f - mean) / std).argmax(-1)] for f in features]
