"""Cut a transformers model into segments and set up fine-tuning per segment.

Settings (VFLAIR-LLM's terms):

* **HT** (head-tail): ``head`` = embeddings + first ``head_layers`` blocks (data party);
  ``body`` = the remaining blocks + final norm + task head (model party).
* **HBT** (head-body-tail): ``head`` as above; ``body`` = the middle blocks (model party);
  ``tail`` = the last ``tail_layers`` blocks + final norm + task head (data party), so labels
  and outputs never leave the data party.

Segments hold references to the model's own modules, so LoRA injected into a segment lives in the
model, and the unsplit model run on the same object is the exact reference the tests compare to.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from splitfed.models.families import FAMILIES, FamilyAdapter, check_supported
from splitfed.models.families import SplitConfigError as SplitConfigError  # defined with the families

Setting = Literal["ht", "hbt"]
FinetuneMode = Literal["frozen", "lora", "full"]

#: Each family's default LoRA targets (declared on the family adapter), by family name.
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {a.name: a.lora_targets for a in FAMILIES.values()}


#: The auto class that builds the task model each head needs (named in errors).
TASK_MODEL_CLASSES = {
    "causal_lm": "AutoModelForCausalLM",
    "classification": "AutoModelForSequenceClassification",
    "span_qa": "AutoModelForQuestionAnswering",
}

RAW_EMBEDDINGS_RISK = (
    "raw token embeddings cross to the model party, which can map each one back to its token id "
    "(with tied weights its own LM head is the embedding matrix; otherwise the public checkpoint's is)"
)


class PrivacyWarning(UserWarning):
    """A setting the user opted into that lets the model party see what the split would hide."""


@dataclass(frozen=True)
class SplitSpec:
    """Where to cut.

    Parameters
    ----------
    setting : {"ht", "hbt"}, default "ht"
    head_layers : int, default 2
        Blocks kept by the data party after the embeddings. ``0`` sends raw token embeddings,
        which reveal every token id, and needs ``allow_raw_embeddings``.
    tail_layers : int, default 0
        HBT only: last blocks kept by the data party (with the final norm and task head).
    allow_raw_embeddings : bool, default False
        Opt in to ``head_layers=0``; :func:`partition` then warns (:class:`PrivacyWarning`).
    """

    setting: Setting = "ht"
    head_layers: int = 2
    tail_layers: int = 0
    allow_raw_embeddings: bool = False

    def check_raw_embeddings(self) -> None:
        """Raise :class:`SplitConfigError` for ``head_layers=0`` without ``allow_raw_embeddings``."""
        if self.head_layers == 0 and not self.allow_raw_embeddings:
            raise SplitConfigError(
                f"split.head_layers: 0 keeps no block on the data party, so {RAW_EMBEDDINGS_RISK}; "
                "keep at least one block (split.head_layers >= 1), or accept this with "
                "split.allow_raw_embeddings: true"
            )

    def check(self, num_layers: int) -> None:
        """Raise :class:`SplitConfigError` if the cut does not fit a model of ``num_layers`` blocks."""
        if self.setting not in ("ht", "hbt"):
            raise SplitConfigError(f"split.setting must be 'ht' or 'hbt', got {self.setting!r}")
        if self.head_layers < 0 or self.tail_layers < 0:
            raise SplitConfigError(
                f"split.head_layers ({self.head_layers}) and split.tail_layers ({self.tail_layers}) "
                "must not be negative"
            )
        if self.setting == "ht" and self.tail_layers:
            raise SplitConfigError(
                f"split.tail_layers={self.tail_layers} needs split.setting: hbt (in HT the model party "
                "holds every block after the head)"
            )
        if self.setting == "hbt" and self.tail_layers < 1:
            raise SplitConfigError("split.setting: hbt needs split.tail_layers >= 1")
        self.check_raw_embeddings()
        if self.head_layers + self.tail_layers > num_layers - 1:
            raise SplitConfigError(
                f"split points out of range: head_layers={self.head_layers} + tail_layers={self.tail_layers} "
                f"leaves no block for the model party; this model has {num_layers} layers, so "
                f"head_layers + tail_layers must be at most {num_layers - 1}"
            )


@dataclass(frozen=True)
class FinetuneSpec:
    """How one segment is trained.

    Parameters
    ----------
    mode : {"frozen", "lora", "full"}, default "lora"
    r : int, default 8
    alpha : float, default 16
    dropout : float, default 0.0
    target_modules : tuple[str, ...] | None, default None
        Module names to adapt; ``None`` uses the family default (q/v projections).
    train_task_head : bool, default True
        Train a freshly initialised task head (classification / span-QA) held by this segment
        even in ``lora`` mode. A frozen segment trains nothing.
    init_lora_weights : bool, default True
        peft's init (B = 0). Tests pass ``False`` so that every LoRA parameter gets a gradient.
    """

    mode: FinetuneMode = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    train_task_head: bool = True
    init_lora_weights: bool = True


class Segment(nn.Module):
    """A contiguous piece of a model: optional embeddings, blocks ``[start, end)``, optional finish.

    Parameters
    ----------
    role : str
        ``"head"``, ``"body"`` or ``"tail"``.
    model : nn.Module
        The whole task model the segment is cut from (not registered as a submodule).
    family : FamilyAdapter
        The model family's adapter (how to embed, run blocks and finish; not LoRA adapters).
    start, end : int
        Block range.
    embed, finish : bool
        Whether the segment starts with the embeddings / ends with final norm + task head.
    task_head : str
        The model's task head (its output layer: ``"causal_lm"``, ``"classification"`` or
        ``"span_qa"``); not to be confused with the head *segment* (``role="head"``).
    """

    def __init__(
        self,
        role: str,
        model: nn.Module,
        family: FamilyAdapter,
        start: int,
        end: int,
        embed: bool,
        finish: bool,
        task_head: str,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)  # a plain reference: parameters stay the segment's own
        self.role = role
        self.family = family
        self.start, self.end = start, end
        self.has_embed, self.has_finish, self.task_head = embed, finish, task_head
        self.config = model.config
        self.parts = nn.ModuleDict()
        if embed:
            for name, module in family.embedding_modules(model).items():
                self.parts[name] = module
        self.blocks = nn.ModuleList(family.layers(model)[start:end])
        if finish:
            for name, module in family.finish_modules(model, task_head).items():
                self.parts[name] = module

    def extra_repr(self) -> str:
        return (
            f"role={self.role}, embed={self.has_embed}, blocks=[{self.start}, {self.end}), "
            f"finish={self.has_finish}, task_head={self.task_head}"
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids or their token embeddings (segment with embeddings) or hidden states in; hidden states
        or logits out. ``inputs_embeds``: see :meth:`FamilyAdapter.embed`."""
        model: nn.Module = self.model  # type: ignore[assignment]
        if self.has_embed:
            if input_ids is None and inputs_embeds is None:
                raise SplitConfigError(
                    f"segment {self.role!r} holds the embeddings and needs input_ids or inputs_embeds"
                )
            hidden = self.family.embed(
                model, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds=inputs_embeds
            )
        elif hidden is None:
            raise ValueError(f"segment {self.role!r} needs hidden states from the previous segment")
        if self.end > self.start:
            blocks = range(self.start, self.end)
            ctx = self.family.context(model, hidden, attention_mask, position_ids, past_key_values, blocks)
            for index in range(self.start, self.end):
                hidden = self.family.run_layer(model, index, hidden, ctx)
        if self.has_finish:
            return self.family.finish(model, hidden, attention_mask, self.task_head)
        return hidden

    def starting_at(self, start: int) -> Segment:
        """This segment entered at block ``start`` instead (for a data party with a deeper head).

        SplitFrozen lets each device choose how many blocks it runs; the model party serves each
        from its own block, sharing modules and adapters with this segment.
        """
        if start == self.start:
            return self
        if self.has_embed or not self.start < start < self.end:
            raise SplitConfigError(
                f"a data party with head_layers={start} cannot be served: this model party holds blocks "
                f"[{self.start}, {self.end}), so head_layers must be between {self.start} and {self.end - 1}"
            )
        model: nn.Module = self.model  # type: ignore[assignment]
        return Segment(self.role, model, self.family, start, self.end, False, self.has_finish, self.task_head)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that receive gradients."""
        return (p for p in self.parameters() if p.requires_grad)

    def named_model_parameters(self, trainable_only: bool = False) -> dict[str, nn.Parameter]:
        """This segment's parameters under their names in the whole model (stable across parties)."""
        mine = {id(p) for p in self.parameters()}
        model: nn.Module = self.model  # type: ignore[assignment]
        return {
            name: p
            for name, p in model.named_parameters(remove_duplicate=False)
            if id(p) in mine and (p.requires_grad or not trainable_only)
        }

    @property
    def is_trainable(self) -> bool:
        """Whether any parameter of the segment is trained."""
        return any(p.requires_grad for p in self.parameters())


def _untie_across(segments: dict[str, Segment], owner: dict[str, str]) -> None:
    """Give segments of different parties their own copy of any parameter they share.

    SmolLM2 ties ``lm_head`` to ``embed_tokens``; in HT they end up on different parties, which
    on a network never share memory, so the simulator must not share them either.
    """
    seen: dict[int, str] = {}
    for role, segment in segments.items():
        for module in segment.modules():
            for pname, param in list(module.named_parameters(recurse=False)):
                first = seen.setdefault(id(param), role)
                if owner[first] != owner[role]:
                    setattr(
                        module, pname, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                    )
                    seen[id(getattr(module, pname))] = role


def partition(model: nn.Module, spec: SplitSpec, head: str) -> dict[str, Segment]:
    """Cut ``model`` into ``{"head", "body"}`` (HT) or ``{"head", "body", "tail"}`` (HBT).

    ``model`` is a task model with the head ``head`` (see :data:`TASK_MODEL_CLASSES`). With
    ``head_layers=0`` (opted in) it warns with a :class:`PrivacyWarning` that raw embeddings cross.

    Raises
    ------
    SplitConfigError
        If the family is not supported, the family or ``model`` lacks ``head``, the split points do
        not fit the model, or ``head_layers=0`` is not opted in.
    """
    family = check_supported(model.config, head)
    _check_task_model(model, family, head)
    n = family.num_layers(model)
    spec.check(n)
    if spec.head_layers == 0:
        warnings.warn(
            f"split.head_layers is 0 (split.allow_raw_embeddings: true): {RAW_EMBEDDINGS_RISK}; "
            "the model party can read the data party's text",
            PrivacyWarning,
            stacklevel=2,
        )
    h = spec.head_layers
    if spec.setting == "ht":
        segments = {
            "head": Segment("head", model, family, 0, h, embed=True, finish=False, task_head=head),
            "body": Segment("body", model, family, h, n, embed=False, finish=True, task_head=head),
        }
        owner = {"head": "data", "body": "model"}
    else:
        t = n - spec.tail_layers
        segments = {
            "head": Segment("head", model, family, 0, h, embed=True, finish=False, task_head=head),
            "body": Segment("body", model, family, h, t, embed=False, finish=False, task_head=head),
            "tail": Segment("tail", model, family, t, n, embed=False, finish=True, task_head=head),
        }
        owner = {"head": "data", "body": "model", "tail": "data"}
    _untie_across(segments, owner)
    return segments


def _check_task_model(model: nn.Module, family: FamilyAdapter, head: str) -> None:
    """Refuse a model that lacks the modules a ``head`` split cuts (a base model, another task's head)."""
    try:
        family.layers(model)
        family.embedding_modules(model)
        family.finish_modules(model, head)
    except AttributeError as err:
        raise SplitConfigError(
            f"a {head} split needs a task model with the {head} head, as "
            f"{TASK_MODEL_CLASSES[head]}.from_pretrained builds it; got {type(model).__name__}: {err}"
        ) from None


@dataclass
class FinetuneReport:
    """What :func:`apply_finetune` made trainable."""

    trainable: int = 0
    total: int = 0
    lora_modules: list[str] = field(default_factory=list)


def apply_finetune(segment: Segment, spec: FinetuneSpec) -> FinetuneReport:
    """Set up ``segment`` for training per ``spec``: freeze, inject LoRA (peft), or train fully."""
    if spec.mode not in ("frozen", "lora", "full"):
        raise SplitConfigError(f"finetune mode must be one of frozen, lora, full; got {spec.mode!r}")
    report = FinetuneReport()
    for p in segment.parameters():
        p.requires_grad_(spec.mode == "full")
    if spec.mode == "lora" and len(segment.blocks) > 0:
        report.lora_modules = _inject_lora(segment, spec)
    if spec.mode == "lora" and spec.train_task_head and segment.has_finish:
        for name in segment.family.task_head_names(segment.task_head):
            for p in segment.parts[name].parameters():
                p.requires_grad_(True)
    params = list(segment.parameters())
    report.total = sum(p.numel() for p in params)
    report.trainable = sum(p.numel() for p in params if p.requires_grad)
    return report


def _inject_lora(segment: Segment, spec: FinetuneSpec) -> list[str]:
    from peft import LoraConfig, inject_adapter_in_model

    targets = spec.target_modules or segment.family.lora_targets
    present = {name.rsplit(".", 1)[-1] for name, _ in segment.blocks.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise SplitConfigError(
            f"LoRA target_modules {missing} do not exist in the {segment.role} segment's blocks; "
            f"module names there include: {sorted(n for n in present if n)[:20]}"
        )
    pattern = r".*\.(" + "|".join(re.escape(t) for t in targets) + r")$"
    config = LoraConfig(
        r=spec.r,
        lora_alpha=int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha,  # type: ignore[arg-type]
        lora_dropout=spec.dropout,
        target_modules=pattern,
        init_lora_weights=spec.init_lora_weights,
        fan_in_fan_out=segment.family.lora_fan_in_fan_out,
    )
    # Inject into the blocks only: they are shared with the model, so the model sees the adapters.
    inject_adapter_in_model(config, segment.blocks)
    lora_names = [n for n, m in segment.blocks.named_modules() if hasattr(m, "lora_A")]
    for name, p in segment.blocks.named_parameters():
        p.requires_grad_("lora_" in name)
    return lora_names
