"""TextObfuscator: tokens of one cluster become one prototype up to noise; a split step still trains."""

from __future__ import annotations

import pytest
import torch

from splitfed.models.partition import FinetuneSpec, SplitSpec
from splitfed.privacy.defenses import build_defense
from splitfed.privacy.defenses.textobfuscator import TextObfuscator, kmeans
from splitfed.split.front import DataFront, FrontContext, FrontResources, build_front
from splitfed.split.parties import OptimSpec
from splitfed.split.system import build_split
from tiny import simple_loss, tiny_batch, tiny_model

CLUSTERS = 6


def _obfuscator(model: torch.nn.Module | None = None, **params: object) -> TextObfuscator:
    defense = build_defense({"name": "textobfuscator", "n_clusters": CLUSTERS, **params})
    assert isinstance(defense, TextObfuscator)
    defense.setup(FrontResources(model if model is not None else tiny_model("llama", "classification")))
    return defense


def test_kmeans_recovers_well_separated_blobs() -> None:
    g = torch.Generator().manual_seed(0)
    truth = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.3 * torch.randn(50, 2, generator=g) for c in truth])
    centers = kmeans(points, 3, 10, torch.Generator().manual_seed(3))
    assert torch.cdist(truth, centers).min(-1).values.max() < 0.2


def test_tokens_of_one_cluster_become_indistinguishable_up_to_noise() -> None:
    model = tiny_model("llama", "classification")
    table = model.model.embed_tokens.weight.detach()
    clean_obf = _obfuscator(model, noise_scale=0.0, obfuscate="embeddings")
    labels = clean_obf.labels
    assert labels.shape == (97,) and len(set(labels.tolist())) > 1
    ids = torch.arange(97)[None, :]
    ctx = FrontContext("eval", input_ids=ids)
    out = clean_obf.on_embeddings(table[ids], ctx)[0]
    for c in labels.unique().tolist():
        members = out[labels == c]
        assert torch.equal(members, members[:1].expand_as(members))  # one vector per cluster
        assert torch.allclose(members[0], table[labels == c].mean(0), atol=1e-6)  # the cluster's mean
    # Without ids, the nearest center gives the same clusters.
    assert torch.equal(clean_obf.cluster_of(table[ids]), labels[None, :])
    # With noise: same-cluster outputs differ by the noise only, far less than across clusters.
    noisy = _obfuscator(model, noise_scale=0.05, obfuscate="embeddings").on_embeddings(table[ids], ctx)[0]
    rms = float(table.pow(2).mean().sqrt())
    same = labels[:, None] == labels[None, :]
    gaps = torch.cdist(noisy, noisy)
    expected = 0.05 * rms * (2 * 32) ** 0.5  # |n1 - n2| of two N(0, s^2 I_32) draws
    off_diagonal = same & ~torch.eye(97, dtype=torch.bool)
    assert float(gaps[off_diagonal].mean()) == pytest.approx(expected, rel=0.1)
    assert float(gaps[~same].min()) > 1.5 * float(gaps[off_diagonal].max())
    assert noisy.dtype == table.dtype
    assert clean_obf.on_embeddings(table[ids].bfloat16(), ctx).dtype == torch.bfloat16


def test_by_default_the_representations_get_noise_scaled_to_their_real_tokens_rms() -> None:
    model = tiny_model("llama", "classification")
    obf = _obfuscator(model, noise_scale=0.5)
    table = model.model.embed_tokens.weight.detach()
    ids = torch.arange(40).reshape(2, 20)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 10:] = 0
    ctx = FrontContext("eval", input_ids=ids, attention_mask=mask)
    assert torch.equal(obf.on_embeddings(table[ids], ctx), table[ids])  # the words are kept
    torch.manual_seed(0)
    hidden = 3.0 * torch.randn(2, 20, 512)
    hidden[1, 10:] = 1000.0  # padding must not set the scale
    out = obf.on_activations(hidden, ctx)
    assert isinstance(out, torch.Tensor)
    rms = float(hidden[mask.bool()].pow(2).mean().sqrt())
    assert float((out - hidden).std()) == pytest.approx(0.5 * rms, rel=0.05)
    off = _obfuscator(model, noise_scale=0.5, phases=["train"])
    off.on_embeddings(table[ids], ctx)
    assert torch.equal(off.on_activations(hidden, ctx), hidden)  # not in its phases


def _system(weight: float):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = tiny_model("llama", "classification")
    obf = _obfuscator(model, cluster_weight=weight)
    ft = {
        "head": FinetuneSpec("lora", r=2),
        "body": FinetuneSpec("lora", r=2),
        "tail": FinetuneSpec("lora", r=2),
    }
    system = build_split(
        model,
        SplitSpec("hbt", 1, 1),
        "classification",
        ft,  # type: ignore[arg-type]
        simple_loss("classification"),
        OptimSpec(lr=1e-2),
        front=DataFront([obf]),
    )
    return system, obf


def test_a_classification_split_step_runs_trains_and_the_cluster_loss_reaches_the_head() -> None:
    batch = tiny_batch("classification")
    grads = {}
    for weight in (0.0, 1.0):
        system, obf = _system(weight)
        party = system.data_party
        head = {n: p for n, p in system.segments["head"].named_parameters() if p.requires_grad}
        torch.manual_seed(1)  # the same noise in both runs
        party.train_step(batch, update=False)
        grads[weight] = {n: p.grad.detach().clone() for n, p in head.items() if p.grad is not None}
        before = {n: p.detach().clone() for n, p in head.items()}
        result = party.train_step(batch)
        assert torch.isfinite(torch.tensor(result.loss))
        assert any(not torch.equal(p, before[n]) for n, p in head.items())  # the head trained
        assert party.predict(batch).shape == (3, 3)
        ctx = FrontContext("train", attention_mask=batch["attention_mask"], input_ids=batch["input_ids"])
        obf.on_embeddings(torch.zeros(3, 9, 32), ctx)
        out = obf.on_activations(torch.randn(3, 9, 32, requires_grad=True), ctx)
        if weight:
            assert isinstance(out, tuple) and float(out[1].detach()) > 0 and out[1].requires_grad
            assert isinstance(obf.on_activations(torch.randn(3, 9, 32), FrontContext("eval")), torch.Tensor)
        else:
            assert isinstance(out, torch.Tensor)
    assert grads[0.0].keys() == grads[1.0].keys() and grads[0.0]
    assert any(not torch.allclose(grads[0.0][n], grads[1.0][n]) for n in grads[0.0])


def test_it_builds_for_config_validation_and_refuses_to_run_before_setup() -> None:
    front = build_front([{"name": "textobfuscator"}], hidden_size=8)
    assert front.touches_embeddings and not front.trains
    with pytest.raises(RuntimeError, match="setup\\(\\) has not run"):
        front.embeddings(torch.zeros(1, 2, 8), FrontContext("train"))
    built = build_front(
        [{"name": "textobfuscator", "n_clusters": 500}], tiny_model("llama", "classification")
    )
    assert built.defenses[0].centers.shape == (97, 32)  # type: ignore[attr-defined]
    assert not built.state_dict()  # centers are recomputed from the public model, never saved
