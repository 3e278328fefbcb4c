"""An example trainable defense: a learned mixing of the activations plus Gaussian noise.

Not a published defense: it exists to exercise every part of the front a real one uses (a module
with trainable parameters that trains with the task, an auxiliary loss, a different behaviour per
phase). The published defenses (activation DP, MID, adversarial training, ...) follow the same shape.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from splitfed.split.front import Defense, FrontContext


class GaussianMixer(Defense, nn.Module):
    """Learned linear mixing (identity at start) of the outgoing activations plus Gaussian noise.

    ``h' = h W + b + sigma * rms(h) * eps`` per token, with ``eps ~ N(0, I)`` drawn afresh at
    every use (training, evaluation and every decoding step; ``noise_at_eval: false`` keeps
    evaluation and generation noise-free), and the auxiliary loss ``weight * mean((h' - h)^2)``,
    which keeps the mixing near the identity.

    Parameters
    ----------
    hidden_size : int
        Width of the activations (the run fills it in from the model).
    sigma : float, default 0.01
        Noise scale relative to each token's root-mean-square activation.
    weight : float, default 0.1
        Weight of the auxiliary loss.
    noise_at_eval : bool, default True
    """

    name = "gaussian_mixer"

    class Params(BaseModel):
        """Parameters of :class:`GaussianMixer` (validated from the YAML)."""

        model_config = ConfigDict(extra="forbid")
        hidden_size: int = Field(gt=0, description="width of the activations (filled in by the run)")
        sigma: float = Field(0.01, ge=0.0, le=100.0, description="noise relative to each token's RMS")
        weight: float = Field(0.1, ge=0.0, description="weight of the auxiliary loss")
        noise_at_eval: bool = Field(True, description="also add noise in evaluation and generation")

    def __init__(
        self, hidden_size: int, sigma: float = 0.01, weight: float = 0.1, noise_at_eval: bool = True
    ) -> None:
        nn.Module.__init__(self)
        self.mix = nn.Linear(hidden_size, hidden_size)
        with torch.no_grad():
            self.mix.weight.copy_(torch.eye(hidden_size))
            self.mix.bias.zero_()
        self.sigma, self.weight, self.noise_at_eval = sigma, weight, noise_at_eval

    def on_activations(
        self, hidden: torch.Tensor, context: FrontContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mixed = self.mix(hidden.to(self.mix.weight.dtype)).to(hidden.dtype)
        if self.sigma > 0 and (context.phase == "train" or self.noise_at_eval):
            rms = hidden.detach().pow(2).mean(-1, keepdim=True).sqrt()
            mixed = mixed + self.sigma * rms * torch.randn_like(mixed)
        return mixed, self.weight * (mixed - hidden).pow(2).mean()
