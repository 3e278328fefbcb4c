"""Split equivalence on the real offline models (integration: needs `splitfed assets fetch`)."""

from __future__ import annotations

import pytest
import torch

from splitfed.assets import is_fetched
from splitfed.models.loading import load_model, load_tokenizer
from splitfed.models.partition import FinetuneSpec, SplitSpec
from splitfed.split.parties import OptimSpec
from splitfed.split.system import build_split
from tiny import simple_loss

pytestmark = pytest.mark.integration

CASES = [
    ("smollm2-135m", "causal_lm", SplitSpec("ht", 2)),
    ("smollm2-135m", "classification", SplitSpec("hbt", 2, 2)),
    ("minilm-l6", "classification", SplitSpec("ht", 1)),
    ("minilm-l6", "span_qa", SplitSpec("hbt", 1, 1)),
]


@pytest.mark.parametrize(("name", "head", "spec"), CASES, ids=lambda v: getattr(v, "setting", v))
def test_real_model_split_equals_unsplit(name: str, head: str, spec: SplitSpec) -> None:
    if not is_fetched(name):
        pytest.skip(f"asset {name} not fetched (run: splitfed assets fetch {name})")
    torch.manual_seed(0)
    tokenizer = load_tokenizer(name)
    model = load_model(
        name, head, num_labels=2 if head == "span_qa" else 3, pad_token_id=tokenizer.pad_token_id
    )
    model.eval()
    enc = tokenizer(
        ["To be, or not to be, that is the question.", "All the world's a stage."],
        padding=True,
        return_tensors="pt",
    )
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if head == "causal_lm":
        batch["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    elif head == "classification":
        batch["labels"] = torch.tensor([0, 2])
    else:
        batch["labels"] = torch.tensor([[1, 3], [2, 2]])
    lora = FinetuneSpec("lora", r=4, init_lora_weights=False)
    loss_fn = simple_loss(head)
    system = build_split(
        model, spec, head, dict.fromkeys(("head", "body", "tail"), lora), loss_fn, OptimSpec(lr=0)
    )
    model.eval()

    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ref = torch.stack([out.start_logits, out.end_logits], -1) if head == "span_qa" else out.logits
    torch.testing.assert_close(system.data_party.predict(batch), ref, atol=1e-5, rtol=0)

    # Training runs with dropout on (minilm has 0.1): the same seed gives both runs the same masks.
    torch.manual_seed(1)
    system.data_party.train_step(batch, update=False)
    split_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.train()
    torch.manual_seed(1)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = torch.stack([out.start_logits, out.end_logits], -1) if head == "span_qa" else out.logits
    loss_fn(logits, batch).backward()
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert split_grads.keys() == ref_grads.keys() and len(ref_grads) > 0
    for n, g in ref_grads.items():
        torch.testing.assert_close(split_grads[n], g, atol=1e-5, rtol=0, msg=n)
