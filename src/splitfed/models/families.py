"""Per-family adapters: how to embed, run layers ``i..j`` and finish a transformers model.

Each adapter uses the library's own modules (embeddings, decoder/encoder layers, rotary
embeddings, mask builders, task heads) and only re-states the few lines of each model's outer
``forward`` that glue them together, so that a model can be cut between any two layers.

The registry :data:`FAMILIES` maps a config ``model_type`` to its adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from splitfed.models.shapes import LayerShape

HEADS = ("causal_lm", "classification", "span_qa")


class SplitConfigError(ValueError):
    """A split point, fine-tuning setting, model family or task head that does not fit the model."""


@dataclass
class LayerContext:
    """What every layer of one forward pass needs besides the hidden states.

    Built by each party from the 2-D ``attention_mask`` that crosses with the activations, so
    masks and position encodings never cross the wire.
    """

    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None = None
    masks: dict[str, Any] = field(default_factory=dict)
    position_embeddings: Any = None
    past_key_values: Any = None


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position of each row (decoder classification pools there).

    transformers pools at the rightmost token that is not ``pad_token_id``; a party past the cut
    has no token ids, so the attention mask stands in for them. Both agree when padding tokens
    appear only where the mask is 0, which the collators guarantee.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.to(torch.long)).argmax(-1)


class FamilyAdapter:
    """Base class: the cut points of one model family.

    Subclasses name the modules of the family (:meth:`layers`, :meth:`embedding_modules`,
    :meth:`finish_modules`) and implement :meth:`embed`, :meth:`context`, :meth:`run_layer` and
    :meth:`finish`.
    """

    name = "base"
    model_types: tuple[str, ...] = ()
    heads: tuple[str, ...] = HEADS
    #: Modules LoRA targets by default (attention queries and values, as LoRA's paper does).
    lora_targets: tuple[str, ...] = ()
    #: attribute of the task model that holds the backbone, per head
    backbone_attr: str = "model"
    #: The family's module name of each projection (for FLOP counts of LoRA targets).
    projections: tuple[tuple[str, str], ...] = ()
    #: LoRA must transpose: the family's linear layers store ``[in, out]`` (GPT-2's Conv1D).
    lora_fan_in_fan_out: bool = False

    def layer_shape(self, config: Any) -> LayerShape:
        """The block dimensions FLOP counts need, read from ``config``."""
        raise NotImplementedError

    def backbone(self, model: Any) -> Any:
        """The backbone inside a task model (``model.model``, ``model.transformer``, ...)."""
        return getattr(model, self.backbone_attr)  # type: ignore[no-any-return]

    def layers(self, model: Any) -> nn.ModuleList:
        """The stack of transformer blocks."""
        raise NotImplementedError

    def num_layers(self, model: Any) -> int:
        """Number of transformer blocks."""
        return len(self.layers(model))

    def embedding_modules(self, model: Any) -> dict[str, nn.Module]:
        """Modules used by :meth:`embed` (they go to the party holding the embeddings)."""
        raise NotImplementedError

    def finish_modules(self, model: Any, head: str) -> dict[str, nn.Module]:
        """Modules used by :meth:`finish`: final norm and task head."""
        raise NotImplementedError

    def task_head_names(self, head: str) -> tuple[str, ...]:
        """Names (keys of :meth:`finish_modules`) of freshly initialised task-head modules.

        These are trained even when the segment is otherwise LoRA-tuned, as peft's
        ``modules_to_save`` does.
        """
        return ()

    def embed(
        self,
        model: Any,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids, or their token embeddings ``inputs_embeds``, to the hidden states that enter layer 0.

        ``inputs_embeds`` replaces what :meth:`token_embeddings` returns for ``input_ids``
        (positions, token types and normalization are still added here): defenses perturb it,
        inversion attacks optimize it.
        """
        raise NotImplementedError

    def token_embedding_layer(self, model: Any) -> nn.Embedding:
        """The token embedding table (vocabulary x hidden)."""
        raise NotImplementedError

    def token_embeddings(self, model: Any, input_ids: torch.Tensor) -> torch.Tensor:
        """What :meth:`embed` takes as ``inputs_embeds`` for ``input_ids``."""
        return self.token_embedding_layer(model)(input_ids)  # type: ignore[no-any-return]

    def soft_embeddings(self, model: Any, weights: torch.Tensor) -> torch.Tensor:
        """``inputs_embeds`` of soft tokens: ``weights [..., vocab]`` (one-hot rows give :meth:`token_embeddings`)."""
        layer = self.token_embedding_layer(model)
        out = weights.to(layer.weight.dtype) @ layer.weight
        scale = getattr(layer, "embed_scale", None)  # Gemma scales inside its embedding module
        return out * scale.to(out.dtype) if isinstance(scale, torch.Tensor) else out

    def context(
        self,
        model: Any,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        layers: range | None = None,
    ) -> LayerContext:
        """Masks and position encodings for running blocks ``layers`` on ``hidden``.

        With a KV cache, ``attention_mask`` covers the cached and the new positions, and the cache
        is read at the first block of ``layers`` (a party's cache only fills its own blocks).
        """
        raise NotImplementedError

    def run_layer(self, model: Any, index: int, hidden: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """Run block ``index`` on ``hidden``."""
        raise NotImplementedError

    def finish(
        self, model: Any, hidden: torch.Tensor, attention_mask: torch.Tensor | None, head: str
    ) -> torch.Tensor:
        """Final norm and task head: hidden states after the last block to the task's logits."""
        raise NotImplementedError


def _default_positions(hidden: torch.Tensor, past_key_values: Any, layer: int = 0) -> torch.Tensor:
    past = past_key_values.layers[layer].get_seq_length() if past_key_values is not None else 0
    return (torch.arange(hidden.shape[1], device=hidden.device) + past).unsqueeze(0)


class DecoderAdapter(FamilyAdapter):
    """Llama-style decoders: Llama (and SmolLM2), Qwen2, Mistral, Gemma.

    ``model.model.{embed_tokens, layers, norm, rotary_emb}`` with ``lm_head`` or ``score``; layers
    take ``position_embeddings`` and a mask chosen per ``config.layer_types`` (full or sliding).
    """

    name = "llama"
    model_types: tuple[str, ...] = ("llama", "qwen2", "mistral", "gemma", "qwen3")
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    heads: tuple[str, ...] = ("causal_lm", "classification")
    projections: tuple[tuple[str, str], ...] = tuple(
        (f"{n}_proj", n) for n in ("q", "k", "v", "o", "gate", "up", "down")
    )

    def layer_shape(self, config: Any) -> LayerShape:
        heads = config.num_attention_heads
        return LayerShape(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
            gated_mlp=True,
            num_layers=config.num_hidden_layers,
            projections=self.projections,
        )

    def layers(self, model: Any) -> nn.ModuleList:
        return self.backbone(model).layers  # type: ignore[no-any-return]

    def embedding_modules(self, model: Any) -> dict[str, nn.Module]:
        return {"embed_tokens": self.backbone(model).embed_tokens}

    def finish_modules(self, model: Any, head: str) -> dict[str, nn.Module]:
        out_name = "lm_head" if head == "causal_lm" else "score"
        return {"norm": self.backbone(model).norm, out_name: getattr(model, out_name)}

    def task_head_names(self, head: str) -> tuple[str, ...]:
        return ("score",) if head == "classification" else ()

    def token_embedding_layer(self, model: Any) -> nn.Embedding:
        return self.backbone(model).embed_tokens  # type: ignore[no-any-return]

    def embed(
        self, model, input_ids, attention_mask, token_type_ids=None, position_ids=None, inputs_embeds=None
    ):  # type: ignore[no-untyped-def]
        if inputs_embeds is not None:
            return inputs_embeds
        return self.backbone(model).embed_tokens(input_ids)

    def _layer_type(self, config: Any, index: int) -> str:
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return str(layer_types[index])
        return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"

    def context(self, model, hidden, attention_mask, position_ids=None, past_key_values=None, layers=None):  # type: ignore[no-untyped-def]
        backbone = self.backbone(model)
        config = backbone.config
        layers = layers if layers is not None else range(config.num_hidden_layers)
        if position_ids is None:
            position_ids = _default_positions(hidden, past_key_values, layers.start)
        kwargs = {
            "config": config,
            "inputs_embeds": hidden,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "position_ids": position_ids,
        }
        first_of_type: dict[str, int] = {}
        for i in layers:
            first_of_type.setdefault(self._layer_type(config, i), i)
        builders = {
            "full_attention": create_causal_mask,
            "sliding_attention": create_sliding_window_causal_mask,
        }
        masks: dict[str, Any] = {
            kind: builders[kind](**kwargs, layer_idx=index) for kind, index in first_of_type.items()
        }
        rope = backbone.rotary_emb(hidden, position_ids=position_ids)
        return LayerContext(attention_mask, position_ids, masks, rope, past_key_values)

    def run_layer(self, model, index, hidden, ctx):  # type: ignore[no-untyped-def]
        layer = self.layers(model)[index]
        mask = ctx.masks[self._layer_type(self.backbone(model).config, index)]
        return layer(
            hidden,
            attention_mask=mask,
            position_embeddings=ctx.position_embeddings,
            position_ids=ctx.position_ids,
            past_key_values=ctx.past_key_values,
            use_cache=ctx.past_key_values is not None,
        )

    def finish(self, model, hidden, attention_mask, head):  # type: ignore[no-untyped-def]
        hidden = self.backbone(model).norm(hidden)
        if head == "causal_lm":
            return model.lm_head(hidden)
        logits = model.score(hidden)
        return _pool_last(logits, attention_mask)


def _pool_last(logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return logits[:, -1]
    index = last_token_index(attention_mask)
    return logits[torch.arange(logits.shape[0], device=logits.device), index]


class GPT2Adapter(FamilyAdapter):
    """GPT-2: ``transformer.{wte, wpe, drop, h, ln_f}`` with ``lm_head`` or ``score``."""

    name = "gpt2"
    model_types: tuple[str, ...] = ("gpt2",)
    lora_targets: tuple[str, ...] = ("c_attn",)
    heads: tuple[str, ...] = ("causal_lm", "classification")
    backbone_attr = "transformer"
    projections: tuple[tuple[str, str], ...] = (("c_attn", "qkv"),)
    lora_fan_in_fan_out = True

    def layer_shape(self, config: Any) -> LayerShape:
        return LayerShape(
            hidden=config.n_embd,
            intermediate=getattr(config, "n_inner", None) or 4 * config.n_embd,
            heads=config.n_head,
            kv_heads=config.n_head,
            head_dim=config.n_embd // config.n_head,
            vocab=config.vocab_size,
            gated_mlp=False,
            num_layers=config.n_layer,
            projections=self.projections,
        )

    def layers(self, model: Any) -> nn.ModuleList:
        return self.backbone(model).h  # type: ignore[no-any-return]

    def embedding_modules(self, model: Any) -> dict[str, nn.Module]:
        b = self.backbone(model)
        return {"wte": b.wte, "wpe": b.wpe, "drop": b.drop}

    def finish_modules(self, model: Any, head: str) -> dict[str, nn.Module]:
        out_name = "lm_head" if head == "causal_lm" else "score"
        return {"ln_f": self.backbone(model).ln_f, out_name: getattr(model, out_name)}

    def task_head_names(self, head: str) -> tuple[str, ...]:
        return ("score",) if head == "classification" else ()

    def token_embedding_layer(self, model: Any) -> nn.Embedding:
        return self.backbone(model).wte  # type: ignore[no-any-return]

    def embed(
        self, model, input_ids, attention_mask, token_type_ids=None, position_ids=None, inputs_embeds=None
    ):  # type: ignore[no-untyped-def]
        b = self.backbone(model)
        tokens = b.wte(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        return b.drop(tokens + b.wpe(position_ids))

    def context(self, model, hidden, attention_mask, position_ids=None, past_key_values=None, layers=None):  # type: ignore[no-untyped-def]
        b = self.backbone(model)
        first = layers.start if layers is not None else 0
        if position_ids is None:
            position_ids = _default_positions(hidden, past_key_values, first)
        mask = create_causal_mask(
            config=b.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            layer_idx=first,
        )
        return LayerContext(attention_mask, position_ids, {"full_attention": mask}, None, past_key_values)

    def run_layer(self, model, index, hidden, ctx):  # type: ignore[no-untyped-def]
        block = self.layers(model)[index]
        return block(
            hidden,
            ctx.past_key_values,
            ctx.masks["full_attention"],
            use_cache=ctx.past_key_values is not None,
            position_ids=ctx.position_ids,
        )

    def finish(self, model, hidden, attention_mask, head):  # type: ignore[no-untyped-def]
        hidden = self.backbone(model).ln_f(hidden)
        if head == "causal_lm":
            return model.lm_head(hidden)
        return _pool_last(model.score(hidden), attention_mask)


class BertAdapter(FamilyAdapter):
    """BERT and RoBERTa encoders (MiniLM is BERT): ``embeddings`` + ``encoder.layer``."""

    name = "bert"
    model_types: tuple[str, ...] = ("bert", "roberta")
    lora_targets: tuple[str, ...] = ("query", "value")
    heads: tuple[str, ...] = ("classification", "span_qa")
    projections: tuple[tuple[str, str], ...] = (("query", "q"), ("key", "k"), ("value", "v"))

    def layer_shape(self, config: Any) -> LayerShape:
        heads = config.num_attention_heads
        return LayerShape(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=heads,
            head_dim=config.hidden_size // heads,
            vocab=config.vocab_size,
            gated_mlp=False,
            num_layers=config.num_hidden_layers,
            pooler=True,
            projections=self.projections,
        )

    def backbone(self, model: Any) -> Any:
        return getattr(model, model.config.model_type)  # type: ignore[no-any-return]

    def layers(self, model: Any) -> nn.ModuleList:
        return self.backbone(model).encoder.layer  # type: ignore[no-any-return]

    def embedding_modules(self, model: Any) -> dict[str, nn.Module]:
        return {"embeddings": self.backbone(model).embeddings}

    def finish_modules(self, model: Any, head: str) -> dict[str, nn.Module]:
        if head == "span_qa":
            return {"qa_outputs": model.qa_outputs}
        mods: dict[str, nn.Module] = {"classifier": model.classifier}
        pooler = getattr(self.backbone(model), "pooler", None)
        if pooler is not None:
            mods["pooler"] = pooler
        if hasattr(model, "dropout"):
            mods["dropout"] = model.dropout
        return mods

    def task_head_names(self, head: str) -> tuple[str, ...]:
        return ("qa_outputs",) if head == "span_qa" else ("classifier",)

    def token_embedding_layer(self, model: Any) -> nn.Embedding:
        return self.backbone(model).embeddings.word_embeddings  # type: ignore[no-any-return]

    def embed(
        self, model, input_ids, attention_mask, token_type_ids=None, position_ids=None, inputs_embeds=None
    ):  # type: ignore[no-untyped-def]
        if inputs_embeds is not None:
            input_ids = None
            embeddings = self.backbone(model).embeddings
            if position_ids is None and attention_mask is not None and hasattr(embeddings, "padding_idx"):
                # RoBERTa numbers positions from its padding index, skipping pads, as it does for ids.
                mask = attention_mask.long()
                position_ids = mask.cumsum(1) * mask + embeddings.padding_idx
            if token_type_ids is None:  # BERT's embeddings take the buffered zeros only for ids
                token_type_ids = torch.zeros(
                    inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device
                )
        return self.backbone(model).embeddings(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
        )

    def context(self, model, hidden, attention_mask, position_ids=None, past_key_values=None, layers=None):  # type: ignore[no-untyped-def]
        mask = create_bidirectional_mask(
            config=self.backbone(model).config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        return LayerContext(attention_mask, position_ids, {"full_attention": mask})

    def run_layer(self, model, index, hidden, ctx):  # type: ignore[no-untyped-def]
        return self.layers(model)[index](hidden, attention_mask=ctx.masks["full_attention"])

    def finish(self, model, hidden, attention_mask, head):  # type: ignore[no-untyped-def]
        if head == "span_qa":
            return model.qa_outputs(hidden)
        if model.config.model_type == "roberta":
            return model.classifier(hidden)
        pooled = self.backbone(model).pooler(hidden)
        return model.classifier(model.dropout(pooled))


class DistilBertAdapter(BertAdapter):
    """DistilBERT: ``distilbert.embeddings`` + ``distilbert.transformer.layer``."""

    name = "distilbert"
    model_types: tuple[str, ...] = ("distilbert",)
    lora_targets: tuple[str, ...] = ("q_lin", "v_lin")
    projections: tuple[tuple[str, str], ...] = (
        ("q_lin", "q"),
        ("k_lin", "k"),
        ("v_lin", "v"),
        ("out_lin", "o"),
    )

    def layer_shape(self, config: Any) -> LayerShape:
        return LayerShape(
            hidden=config.dim,
            intermediate=config.hidden_dim,
            heads=config.n_heads,
            kv_heads=config.n_heads,
            head_dim=config.dim // config.n_heads,
            vocab=config.vocab_size,
            gated_mlp=False,
            num_layers=config.n_layers,
            pooler=True,
            projections=self.projections,
        )

    def backbone(self, model: Any) -> Any:
        return model.distilbert  # type: ignore[no-any-return]

    def layers(self, model: Any) -> nn.ModuleList:
        return self.backbone(model).transformer.layer  # type: ignore[no-any-return]

    def finish_modules(self, model: Any, head: str) -> dict[str, nn.Module]:
        if head == "span_qa":
            return {"qa_outputs": model.qa_outputs, "dropout": model.dropout}
        return {
            "pre_classifier": model.pre_classifier,
            "classifier": model.classifier,
            "dropout": model.dropout,
        }

    def task_head_names(self, head: str) -> tuple[str, ...]:
        return ("qa_outputs",) if head == "span_qa" else ("pre_classifier", "classifier")

    def embed(
        self, model, input_ids, attention_mask, token_type_ids=None, position_ids=None, inputs_embeds=None
    ):  # type: ignore[no-untyped-def]
        if inputs_embeds is not None:
            input_ids = None
        return self.backbone(model).embeddings(input_ids, inputs_embeds, position_ids)

    def finish(self, model, hidden, attention_mask, head):  # type: ignore[no-untyped-def]
        if head == "span_qa":
            return model.qa_outputs(model.dropout(hidden))
        pooled = torch.relu(model.pre_classifier(hidden[:, 0]))
        return model.classifier(model.dropout(pooled))


FAMILIES: dict[str, FamilyAdapter] = {}
for _adapter in (DecoderAdapter(), GPT2Adapter(), BertAdapter(), DistilBertAdapter()):
    for _model_type in _adapter.model_types:
        FAMILIES[_model_type] = _adapter


def family_for(config: Any) -> FamilyAdapter:
    """The adapter for a transformers config.

    Raises
    ------
    SplitConfigError
        If no adapter cuts models of this ``model_type``; the message lists those that are supported.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise SplitConfigError(
            f"model type {model_type!r} cannot be split: splitfed has no family adapter for it; supported "
            f"model types: {', '.join(sorted(FAMILIES))}; choose a model of one of these types (model.name)"
        )
    return FAMILIES[model_type]


def check_supported(config: Any, head: str) -> FamilyAdapter:
    """The adapter for ``config`` after checking that it supports task head ``head``.

    Runs on a config alone, so a model that cannot be split is refused before its weights load.

    Raises
    ------
    SplitConfigError
        For an unsupported ``model_type`` or a task head the family does not have, listing what
        is supported.
    """
    adapter = family_for(config)
    if head not in adapter.heads:
        raise SplitConfigError(
            f"task head {head!r} is not available for {adapter.name}-family models (model type "
            f"{config.model_type!r}); available: {', '.join(adapter.heads)}; choose a task with one of "
            "these heads or a model of another family"
        )
    return adapter
