"""DP-SGD on the data party's own parameters: per-example clipping, Gaussian noise, an RDP accountant.

Abadi et al. 2016, "Deep Learning with Differential Privacy" (CCS): at every optimizer update each
example's gradient is clipped to L2 norm ``C``, the clipped gradients are summed, ``N(0, σ²C²)``
noise is added and the sum is divided by the batch size. The privacy of the whole run is tracked
with Rényi differential privacy (Mironov 2017, "Rényi Differential Privacy", CSF) of the sampled
Gaussian mechanism at integer orders (Mironov, Talwar & Zhang 2019, "Rényi Differential Privacy of
the Sampled Gaussian Mechanism", Sec. 3.3), converted to (ε, δ) with the bound of Balle et al.
2020 ("Hypothesis Testing Interpretations and Renyi Differential Privacy", AISTATS, Thm. 21).

Per-example gradients come from module hooks, as in Goodfellow 2015 ("Efficient Per-Example
Gradient Computations"): a linear layer's gradient is ``Σ_t grad_output_t ⊗ input_t``, so keeping
each example's rows apart gives its own gradient without a per-example backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from splitfed.privacy.accounting import RDPAccountant
from splitfed.split.front import Defense, FrontContext

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle


@dataclass
class _MicroBatch:
    """Per-example gradients of one micro-batch, by tracked parameter."""

    size: int
    loss_scale: float = 1.0
    grads: dict[int, torch.Tensor] = field(default_factory=dict)


class DPSGD(Defense):
    """DP-SGD (Abadi et al. 2016) on the data party's trainable head (and, in HBT, tail) parameters.

    At every optimizer update of the data party, :meth:`before_update` replaces the accumulated
    gradient of each trainable parameter by

    ``g̃ = (w / B) · (Σ_i min(1, C / ‖g_i‖) g_i + N(0, σ²C² I))``

    where ``g_i`` is example ``i``'s gradient of its own loss (all parameters together, one norm),
    ``B`` the number of examples of the update (the union of its micro-batches under gradient
    accumulation) and ``w`` the sum of the micro-batches' ``loss_scale`` (1 with the usual
    ``1/grad_accum``). The task loss of a micro-batch of ``b`` examples is their mean, times its
    loss scale, so an example's share of the accumulated gradient is ``(loss_scale / b) g_i``; the
    hooks recover ``g_i`` from that share. With equal micro-batches ``w / B = loss_scale / b``:
    without clipping and noise the result is the non-private gradient exactly, and ``σ`` is the
    noise multiplier of the literature (noise std ``σC`` on the *sum* of clipped gradients of a
    batch of the expected size). The optimizer's own clipping (``train.max_grad_norm``) runs
    after, on the privatized gradient (post-processing, no privacy cost).

    Per-example gradients come from hooks on every ``nn.Linear`` with trainable parameters of the
    head and tail (LoRA's ``lora_A``/``lora_B``, trainable linear layers and task heads); any other
    trainable module (embeddings, norms) is refused when the data party is built. Each forward's
    input is kept with a hook on its output's gradient, so a micro-batch's records pair correctly
    under pipelined schedules too.

    Privacy guarantee: with ``sample_rate`` the probability that an example is in a batch, the
    run's parameters after ``T`` updates are (ε, δ)-DP for each training example (add/remove), ε
    from the RDP accountant (:meth:`epsilon_spent`; :attr:`epsilon` after every update). Caveats:
    the accountant assumes Poisson sampling, while the run draws shuffled fixed-size batches (the
    usual practice, as in Abadi et al.); an example's gradient must depend on that example only,
    so a loss that couples examples (NoPeek's distance correlation, a token-averaged LM loss
    across a micro-batch) weakens it; the activations and returned gradients that cross to the
    model party are separate releases (combine with ``activation_dp`` / ``grad_dp``), and other
    defenses' trainable parameters are not privatized.

    Parameters
    ----------
    sample_rate : float
        ``q = batch_size / training examples`` (required: the run does not know the data set's
        size when it builds defenses).
    noise_multiplier : float, default 1.0
        ``σ``, noise std in units of ``max_grad_norm`` (0: clipping only, ε infinite).
    max_grad_norm : float, default 1.0
        ``C``, the per-example L2 clipping norm.
    delta : float, default 1e-5
        The δ at which ε is reported (choose it below 1 / training examples).
    """

    name = "dp_sgd"

    class Params(BaseModel):
        """Parameters of :class:`DPSGD` (validated from the YAML)."""

        model_config = ConfigDict(extra="forbid")
        sample_rate: float = Field(
            gt=0.0, le=1.0, description="q = batch_size / training examples, for the accountant (required)"
        )
        noise_multiplier: float = Field(
            1.0, ge=0.0, le=1e4, description="sigma: noise std in units of max_grad_norm"
        )
        max_grad_norm: float = Field(1.0, gt=0.0, description="C: per-example L2 clipping norm")
        delta: float = Field(1e-5, gt=0.0, lt=1.0, description="delta at which epsilon is reported")

    def __init__(
        self,
        sample_rate: float,
        noise_multiplier: float = 1.0,
        max_grad_norm: float = 1.0,
        delta: float = 1e-5,
    ) -> None:
        params = self.Params(
            sample_rate=sample_rate,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            delta=delta,
        )
        self.sample_rate, self.noise_multiplier = params.sample_rate, params.noise_multiplier
        self.max_grad_norm, self.delta = params.max_grad_norm, params.delta
        self.accountant = RDPAccountant(self.sample_rate, self.noise_multiplier)
        #: Optimizer updates privatized so far (checkpointed: ``--resume`` continues ε).
        self.steps = 0
        #: ε at :attr:`delta` after the updates so far.
        self.epsilon = 0.0
        #: Each example's norm after clipping, of the last update (a diagnostic: all ``<= C``).
        self.last_clipped_norms: torch.Tensor | None = None
        self._params: list[nn.Parameter] = []
        self._handles: list[RemovableHandle] = []
        self._records: dict[int, _MicroBatch] = {}
        self._started = 0  # training micro-batches whose head output passed the front
        self._received = 0  # training micro-batches whose reply passed the front
        self._scales: dict[int, float] = {}

    # -- hooks ---------------------------------------------------------------------------------

    def attach(self, head: Any, tail: Any) -> None:
        """Hook the trainable linear layers of ``head`` and ``tail``; refuse other trainable modules."""
        refused: list[str] = []
        seen: set[int] = set()
        for role, segment in (("head", head), ("tail", tail)):
            if segment is None:
                continue
            for path, module in segment.named_modules():
                own = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
                if not own:
                    continue
                if not isinstance(module, nn.Linear):
                    refused.append(f"{role}: {path} ({type(module).__name__})")
                    continue
                seen.update(id(p) for p in own)
                self._track(role, module)
        if refused:
            self.detach()
            raise ValueError(
                "defense dp_sgd computes per-example gradients of linear layers only (LoRA, trainable "
                f"linear layers and task heads); the data party also trains {'; '.join(refused[:8])}"
                + (f" and {len(refused) - 8} more" if len(refused) > 8 else "")
                + ". Train the head with LoRA (finetune.head.mode: lora) or freeze those modules"
            )
        if not self._params:
            raise ValueError(
                "defense dp_sgd: the data party trains no parameters of its own (frozen head, no "
                "trainable tail); DP-SGD has nothing to privatize"
            )

    def detach(self) -> None:
        """Remove the hooks (the defense forgets the segments)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._params.clear()

    def _track(self, role: str, module: nn.Linear) -> None:
        # Parameters by position: a record keys its per-example gradients by these slots.
        weight: int | None = None
        if module.weight.requires_grad:
            weight = len(self._params)
            self._params.append(module.weight)  # type: ignore[arg-type]  # a Parameter, typed Tensor
        bias: int | None = None
        if module.bias is not None and module.bias.requires_grad:
            bias = len(self._params)
            self._params.append(module.bias)  # type: ignore[arg-type]

        def forward_hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return
            # The micro-batch a forward belongs to: the head runs before its output passes the
            # front (on_activations), the tail after the reply did (on_received).
            index = self._started if role == "head" else self._received - 1
            x = inputs[0].detach()

            def grad_hook(grad_output: torch.Tensor) -> None:
                self._record(index, x, grad_output.detach(), weight, bias, mod)

            output.register_hook(grad_hook)

        self._handles.append(module.register_forward_hook(forward_hook))

    def _record(
        self,
        index: int,
        x: torch.Tensor,
        grad_output: torch.Tensor,
        weight: int | None,
        bias: int | None,
        mod: nn.Module,
    ) -> None:
        dtype = torch.promote_types(x.dtype, torch.float32)
        batch = int(x.shape[0])
        # [batch, positions, features]: a linear layer treats every leading dimension as positions.
        a = x.to(dtype).reshape(batch, -1, x.shape[-1])
        g = grad_output.to(dtype).reshape(batch, -1, grad_output.shape[-1])
        record = self._records.get(index)
        if record is None:
            record = self._records[index] = _MicroBatch(batch, self._scales.get(index, 1.0))
        if record.size != batch:
            raise RuntimeError(
                f"defense dp_sgd: micro-batch {index} has {record.size} examples in one layer and "
                f"{batch} in {type(mod).__name__}; per-example gradients need the batch dimension first"
            )
        for slot, per_example in ((weight, torch.einsum("bto,bti->boi", g, a)), (bias, g.sum(1))):
            if slot is None:
                continue
            previous = record.grads.get(slot)
            # A layer used twice in one forward (shared weights) adds its uses' gradients.
            record.grads[slot] = per_example if previous is None else previous + per_example

    def on_activations(self, hidden: torch.Tensor, context: FrontContext) -> torch.Tensor:
        if context.phase == "train":
            self._scales[self._started] = float(context.loss_scale)
            self._started += 1
        return hidden

    def on_received(self, name: str, tensor: torch.Tensor, context: FrontContext) -> torch.Tensor:
        if context.phase == "train":
            self._received += 1
        return tensor

    # -- the update ----------------------------------------------------------------------------

    def per_example_gradients(self) -> list[dict[nn.Parameter, torch.Tensor]]:
        """Each example's gradient of its own loss, ``{parameter: tensor}``, over the micro-batches
        recorded since the last update (in order; a parameter an example did not reach is absent)."""
        out: list[dict[nn.Parameter, torch.Tensor]] = []
        for _, record in sorted(self._records.items()):
            # Its share of the accumulated gradient is (loss_scale / size) · g_i.
            factor = record.size / record.loss_scale
            for i in range(record.size):
                out.append({self._params[s]: g[i] * factor for s, g in record.grads.items()})
        return out

    def before_update(self, context: FrontContext) -> None:
        records = [r for _, r in sorted(self._records.items())]
        self._records.clear()
        self._scales = {k: v for k, v in self._scales.items() if k >= self._started}
        if not records:
            stray = [p for p in self._params if p.grad is not None and bool(p.grad.any())]
            if stray:
                raise RuntimeError(
                    f"defense dp_sgd: {len(stray)} parameters have gradients but no per-example record "
                    "(a backward pass that did not run through the hooked layers)"
                )
            return
        # Every example's squared norm over all parameters, then one clip factor per example.
        squares = torch.cat(
            [
                sum(
                    (g.reshape(r.size, -1).pow(2).sum(1) for g in r.grads.values()),
                    torch.zeros(r.size, dtype=torch.float64),
                )
                * (r.size / r.loss_scale) ** 2
                for r in records
            ]
        )
        norms = squares.sqrt()
        factors = (self.max_grad_norm / norms.clamp_min(1e-30)).clamp(max=1.0)
        self.last_clipped_norms = (norms * factors).float()
        total = sum(r.size for r in records)
        scale = sum(r.loss_scale for r in records) / total
        offsets = [0]
        for r in records:
            offsets.append(offsets[-1] + r.size)
        sigma = self.noise_multiplier * self.max_grad_norm
        for slot, p in enumerate(self._params):
            summed: torch.Tensor | None = None
            for r, start in zip(records, offsets, strict=False):
                g = r.grads.get(slot)
                if g is None:
                    continue
                f = (factors[start : start + r.size] * (r.size / r.loss_scale)).to(g)
                part = torch.einsum("b,b...->...", f, g)
                summed = part if summed is None else summed + part
            if summed is None:
                summed = torch.zeros(
                    p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device
                )
            if sigma > 0:
                summed = summed + sigma * torch.randn_like(summed)
            p.grad = (scale * summed).to(device=p.device, dtype=p.dtype)
        self.steps += 1
        self.epsilon = self.epsilon_spent()

    def step_metrics(self) -> dict[str, float]:
        """ε spent so far at the configured δ (logged with every training step)."""
        return {"epsilon": float(self.epsilon)}

    def epsilon_spent(self, delta: float | None = None) -> float:
        """ε of the updates so far at ``delta`` (default :attr:`delta`); ``inf`` without noise."""
        return self.accountant.epsilon(self.steps, self.delta if delta is None else delta)

    def extra_state(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.epsilon = self.epsilon_spent()
