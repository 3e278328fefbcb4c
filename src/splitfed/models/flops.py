"""Analytical FLOP counts of split training, per party, from a transformers config.

Used to report how much of a training step's compute lands on the data party, e.g. SplitFrozen
(Ma et al. 2025, arXiv:2503.18986: frozen, forward-only data-party layers, LoRA on the model
party) against SplitLoRA (Lin et al. 2024, arXiv:2407.00952: LoRA on both sides).

Counting conventions
--------------------
* One multiply-accumulate = 2 FLOPs. Only matrix products are counted; norms, softmax,
  activations, biases, residual adds, rotary embeddings and the embedding lookup are lower order
  and left out (the standard convention of Kaplan et al. 2020 and Megatron-LM).
* A block (:func:`block_forward_flops`) is q, k, v, o projections (k and v at
  ``kv_heads * head_dim`` wide, so grouped-query attention is cheaper), attention scores
  ``Q K^T`` and the weighted sum ``A V`` (``2 * b * s * s * heads * head_dim`` each; causal
  masking is *not* halved, because dense attention kernels compute the full ``s x s`` matrix),
  and the MLP (two matrices, or three when gated as in Llama).
* The task head (:func:`head_flops`): LM head ``2*b*s*h*V`` on every position, span-QA
  ``2*b*s*h*2``, classification ``2*b*h*C`` on one pooled position (plus the ``h x h`` pooler
  of encoder families).

Training cost model
-------------------
A segment's forward pass costs ``F`` (its blocks, plus the task head if it finishes the model,
plus the LoRA products if LoRA-tuned). Backward costs are in units of ``F``:

* **Does backward reach the segment?** A segment must be backpropagated iff it, or some earlier
  segment, has trainable parameters: the loss gradient has to pass through it to reach them.
  A segment needs ``dL/d(input)`` iff some *earlier* segment is trainable; a segment reached
  only for its own parameters still propagates through nearly all of its blocks (LoRA on layer
  0 needs the gradient at layer 0's q/v outputs), so both cases are charged the same ``F``.
  The SplitFrozen head is first and frozen, so it is forward-only: cost ``F``.
* **Input gradients** (activation gradients through every matrix product): ``+F``.
* **Weight gradients**: full fine-tuning ``+F`` (so ``F + 2F``); LoRA adds only its own
  adapter products, ``2*r*(d_in + d_out)*b*s`` per adapted projection for each of forward,
  input gradient and weight gradient, since the frozen base weights get no gradient; a frozen
  segment adds nothing. A freshly initialised classification / span-QA head trained inside a
  LoRA segment (``train_task_head``) adds its own forward cost as weight gradient.
* The data party holds the head segment (embeddings + first ``head_layers``) and, in HBT, the
  tail (last ``tail_layers`` + final norm + task head); the model party holds the body, which in
  HT includes the task head.

The embedding table's weight gradient (a scatter-add) is not counted. These are analytical
counts, not measured times: attention kernels, recomputation and memory traffic change
wall-clock ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from splitfed.models.families import HEADS
from splitfed.models.partition import SplitConfigError, SplitSpec
from splitfed.models.shapes import LayerShape

MODES = ("frozen", "lora", "full")


def layer_shape(config: Any) -> LayerShape:
    """Read a :class:`LayerShape` from a transformers config (through its family adapter).

    Raises
    ------
    SplitConfigError
        For a model type no family adapter supports.
    """
    from splitfed.models.families import FAMILIES

    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise SplitConfigError(
            f"cannot count FLOPs for model type {model_type!r}; supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type].layer_shape(config)


def block_forward_flops(shape: LayerShape, batch: int, seq: int) -> int:
    """FLOPs (2 x multiply-accumulates) of one block's forward pass over ``batch x seq`` tokens.

    Causal attention is counted as the full ``seq x seq`` matrix (see the module docstring).
    """
    tokens = batch * seq
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    projections = 2 * tokens * (shape.hidden * q + 2 * shape.hidden * kv + q * shape.hidden)
    # Q K^T and A V: each is heads x (seq x head_dim) @ (head_dim x seq) per sequence.
    attention = 2 * 2 * batch * seq * seq * q
    mlp = 2 * tokens * shape.hidden * shape.intermediate * (3 if shape.gated_mlp else 2)
    return projections + attention + mlp


def embed_flops(shape: LayerShape, batch: int, seq: int) -> int:
    """FLOPs of the embeddings: 0, a table lookup has no multiply-accumulates."""
    return 0


def head_flops(shape: LayerShape, batch: int, seq: int, head: str, num_labels: int = 2) -> int:
    """FLOPs of the task head's forward pass.

    ``"causal_lm"``: ``2*b*s*h*V``; ``"span_qa"``: ``2*b*s*h*2``; ``"classification"``:
    ``2*b*h*C`` on the pooled position (plus ``2*b*h*h`` for an encoder's pooler).
    """
    h = shape.hidden
    if head == "causal_lm":
        return 2 * batch * seq * h * shape.vocab
    if head == "span_qa":
        return 2 * batch * seq * h * 2
    if head == "classification":
        return 2 * batch * h * num_labels + (2 * batch * h * h if shape.pooler else 0)
    raise SplitConfigError(f"unknown task head {head!r}; expected one of {', '.join(HEADS)}")


def lora_flops(shape: LayerShape, batch: int, seq: int, r: int, targets: Sequence[str]) -> int:
    """Forward FLOPs of one block's LoRA adapters: ``2*r*(d_in + d_out)*b*s`` per target."""
    return sum(2 * r * sum(shape.projection_dims(t)) * batch * seq for t in targets)


@dataclass(frozen=True)
class PartyFlops:
    """FLOPs of one training step (forward + backward), per party.

    Parameters
    ----------
    data_party : float
        Head segment, plus the tail in HBT.
    model_party : float
        Body segment (with the task head in HT).
    """

    data_party: float
    model_party: float

    @property
    def total(self) -> float:
        """Both parties together."""
        return self.data_party + self.model_party

    @property
    def data_share(self) -> float:
        """Fraction of the step's FLOPs spent by the data party."""
        return self.data_party / self.total if self.total else 0.0


def split_training_flops(
    config: Any,
    spec: SplitSpec,
    batch: int,
    seq: int,
    head: str,
    head_mode: str,
    body_mode: str,
    tail_mode: str = "frozen",
    *,
    lora_r: int = 8,
    lora_targets: Sequence[str] = ("q", "v"),
    num_labels: int | None = None,
    train_task_head: bool = True,
) -> PartyFlops:
    """FLOPs of one split training step per party, under the module docstring's cost model.

    Parameters
    ----------
    config : transformers config
    spec : SplitSpec
        Where the model is cut (checked against the config's layer count).
    batch, seq : int
        Batch size and sequence length.
    head : {"causal_lm", "classification", "span_qa"}
    head_mode, body_mode, tail_mode : {"frozen", "lora", "full"}
        Fine-tuning of each segment; ``tail_mode`` is ignored in HT.
    lora_r : int, default 8
    lora_targets : sequence of str, default ("q", "v")
        Adapted projections in every block of a LoRA segment (generic or family names).
    num_labels : int | None, default None
        Classes of a classification head; ``None`` reads ``config.num_labels`` (else 2).
    train_task_head : bool, default True
        A LoRA segment that finishes the model trains a classification / span-QA head.

    Raises
    ------
    SplitConfigError
        For an unsupported model type, a split that does not fit, or an unknown head or mode.
    """
    shape = layer_shape(config)
    spec.check(shape.num_layers)
    if head not in HEADS:
        raise SplitConfigError(f"unknown task head {head!r}; expected one of {', '.join(HEADS)}")
    modes = {"head": head_mode, "body": body_mode, "tail": tail_mode}
    for role, mode in modes.items():
        if mode not in MODES:
            raise SplitConfigError(f"{role}_mode must be one of {', '.join(MODES)}; got {mode!r}")
    if batch < 1 or seq < 1 or lora_r < 1:
        raise SplitConfigError(f"batch, seq and lora_r must be >= 1; got {batch}, {seq}, {lora_r}")
    labels = num_labels if num_labels is not None else getattr(config, "num_labels", None) or 2

    n, h = shape.num_layers, spec.head_layers
    if spec.setting == "ht":
        layout = [("head", "data", h, False), ("body", "model", n - h, True)]
    else:
        t = spec.tail_layers
        layout = [("head", "data", h, False), ("body", "model", n - h - t, False), ("tail", "data", t, True)]

    block = block_forward_flops(shape, batch, seq)
    task_head = head_flops(shape, batch, seq, head, labels)
    lora_block = lora_flops(shape, batch, seq, lora_r, lora_targets)
    per_party = {"data": 0.0, "model": 0.0}
    upstream_trainable = False
    for role, party, blocks, finishes in layout:
        mode = modes[role]
        base = blocks * block + (task_head if finishes else 0)
        lora = blocks * lora_block if mode == "lora" else 0
        trains_head = finishes and mode == "lora" and train_task_head and head != "causal_lm"
        trainable = mode == "full" or (mode == "lora" and (blocks > 0 or trains_head))
        cost = base + lora  # forward
        if trainable or upstream_trainable:
            cost += base + lora  # input gradients through every product, adapters included
        if mode == "full":
            cost += base  # weight gradients of every matrix
        elif mode == "lora":
            cost += lora + (task_head if trains_head else 0)  # adapter (and fresh head) weights
        per_party[party] += cost
        upstream_trainable = upstream_trainable or trainable
    return PartyFlops(data_party=per_party["data"], model_party=per_party["model"])
