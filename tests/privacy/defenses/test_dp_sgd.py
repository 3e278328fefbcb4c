"""DP-SGD on the data party's parameters: per-example gradients, clipping, noise and the accountant."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from splitfed.config import ConfigError, parse_config
from splitfed.models.partition import FinetuneSpec, SplitSpec
from splitfed.privacy.accounting import RDPAccountant, sampled_gaussian_rdp
from splitfed.privacy.defenses import DefenseConfigError, build_defense
from splitfed.privacy.defenses.dp_sgd import DPSGD
from splitfed.split.front import FrontContext, build_front
from splitfed.split.parties import MicroBatch, OptimSpec
from splitfed.split.system import SplitSystem, build_split
from tiny import run_config, simple_loss, tiny_batch, tiny_model

SPECS = {"ht": SplitSpec("ht", 1), "hbt": SplitSpec("hbt", 1, 1)}


def _system(
    setting: str = "hbt", head: str = "lora", sigma: float = 0.0, clip: float = 1e6, seed: int = 0
) -> tuple[SplitSystem, DPSGD]:
    model = tiny_model("llama", "classification", seed=seed)
    spec = {"name": "dp_sgd", "sample_rate": 0.01, "noise_multiplier": sigma, "max_grad_norm": clip}
    front = build_front([spec], model, seed)
    # B = 0 at peft's default init would leave every lora_A gradient zero: test both factors.
    lora = FinetuneSpec("lora", r=2, init_lora_weights=False)
    finetune = {"head": FinetuneSpec(head, r=2, init_lora_weights=False), "body": lora, "tail": lora}  # type: ignore[arg-type]
    system = build_split(
        model,
        SPECS[setting],
        "classification",
        finetune,
        simple_loss("classification"),
        OptimSpec(),
        front=front,
    )
    dp = front.defenses[0]
    assert isinstance(dp, DPSGD)
    return system, dp


def _party_params(system: SplitSystem) -> list[nn.Parameter]:
    return [
        p
        for role in ("head", "tail")
        if role in system.segments
        for p in system.segments[role].trainable_parameters()
    ]


def _loop_gradients(
    system: SplitSystem, dp: DPSGD, batch: dict[str, torch.Tensor]
) -> list[list[torch.Tensor]]:
    """Each example's gradient of its own loss, by a separate forward and backward per example
    (with the defense's hooks off, so that it records nothing of these passes)."""
    seg, loss_fn = system.segments, simple_loss("classification")
    params = _party_params(system)
    dp.detach()
    out = []
    for i in range(batch["input_ids"].shape[0]):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        hidden = seg["head"](input_ids=row["input_ids"], attention_mask=row["attention_mask"])
        hidden = seg["body"](hidden=hidden, attention_mask=row["attention_mask"])
        logits = seg["tail"](hidden=hidden, attention_mask=row["attention_mask"]) if "tail" in seg else hidden
        grads = torch.autograd.grad(loss_fn(logits, row), params, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)])
    dp.attach(seg["head"], seg.get("tail"))
    return out


def _capture(dp: DPSGD) -> list[dict[nn.Parameter, torch.Tensor]]:
    """The privatized gradients of every update, read right after :meth:`DPSGD.before_update`."""
    seen: list[dict[nn.Parameter, torch.Tensor]] = []
    original = dp.before_update

    def before_update(context: FrontContext) -> None:
        original(context)
        seen.append({p: p.grad.detach().clone() for p in dp._params if p.grad is not None})

    dp.before_update = before_update  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("setting", ["hbt", "ht"])
def test_per_example_gradients_from_hooks_equal_a_per_example_backward_loop(setting: str) -> None:
    system, dp = _system(setting)
    batch = tiny_batch("classification")  # rows padded differently
    system.data_party.train_step(batch, update=False)
    hooked = dp.per_example_gradients()
    looped = _loop_gradients(system, dp, batch)
    params = _party_params(system)
    assert len(hooked) == len(looped) == 3 and set(hooked[0]) == set(params)
    for by_hooks, by_loop in zip(hooked, looped, strict=True):
        assert all(float(g.abs().sum()) > 0 for g in by_loop)  # every factor is exercised
        for p, expected in zip(params, by_loop, strict=True):
            torch.testing.assert_close(by_hooks[p], expected, atol=1e-5, rtol=1e-4)


def test_the_update_is_the_sum_of_clipped_per_example_gradients_each_at_most_c() -> None:
    system, dp = _system()
    batch = tiny_batch("classification")
    looped = _loop_gradients(system, dp, batch)
    norms = torch.tensor([math.sqrt(sum(float(g.pow(2).sum()) for g in grads)) for grads in looped])
    clip = float(norms.median())  # one example below the bound, one at it, one above
    dp.max_grad_norm = clip
    seen = _capture(dp)
    system.data_party.train_step(batch)
    assert dp.last_clipped_norms is not None
    assert bool((dp.last_clipped_norms <= clip * (1 + 1e-5)).all())
    torch.testing.assert_close(
        dp.last_clipped_norms, torch.minimum(norms, torch.tensor(clip)), rtol=1e-4, atol=0
    )
    params = _party_params(system)
    for j, p in enumerate(params):
        expected = (
            sum(min(1.0, clip / float(n)) * grads[j] for n, grads in zip(norms, looped, strict=True)) / 3
        )
        torch.testing.assert_close(seen[0][p], expected, atol=1e-6, rtol=1e-4)


def test_without_clipping_or_noise_the_update_is_the_non_private_gradient() -> None:
    system, dp = _system(clip=1e9)
    batch = tiny_batch("classification")
    for _ in range(2):  # gradient accumulation: loss_scale 1/2 each
        system.data_party.train_step(batch, update=False, loss_scale=0.5)
    plain = {p: p.grad.detach().clone() for p in dp._params}
    dp.before_update(FrontContext("train"))
    for p, g in plain.items():
        torch.testing.assert_close(p.grad, g, atol=1e-7, rtol=1e-4)


def test_the_examples_of_an_update_span_its_micro_batches_also_when_pipelined() -> None:
    first, second = tiny_batch("classification", seed=1), tiny_batch("classification", seed=2)
    whole = {k: torch.cat([first[k], second[k]]) for k in first}
    results = []
    for mode in ("one batch", "accumulated", "pipelined"):
        system, dp = _system(setting="hbt", clip=0.05)  # every example clipped
        seen = _capture(dp)
        party = system.data_party
        if mode == "one batch":
            party.train_step(whole)
        else:
            stream = [MicroBatch(first, False, 0.5), MicroBatch(second, True, 0.5)]
            list(party.train_stream(stream, window=2 if mode == "pipelined" else 1))
        assert dp.last_clipped_norms is not None and dp.last_clipped_norms.shape == (6,)
        torch.testing.assert_close(dp.last_clipped_norms, torch.full((6,), 0.05), rtol=1e-4, atol=0)
        results.append([seen[0][p] for p in dp._params])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-4)


def test_the_noise_on_the_summed_gradient_has_std_sigma_times_c() -> None:
    torch.manual_seed(0)
    sigma, clip, batch = 1.5, 0.4, 4
    layer = nn.Linear(3, 5)
    dp = DPSGD(sample_rate=0.1, noise_multiplier=sigma, max_grad_norm=clip)
    dp.attach(layer, None)
    draws = []
    for _ in range(300):
        out = layer(torch.zeros(batch, 2, 3))  # zero input and zero loss: the true gradient is 0
        dp.on_activations(out, FrontContext("train"))
        (out * 0.0).sum().backward()
        dp.before_update(FrontContext("train"))
        draws.append(torch.cat([layer.weight.grad.flatten(), layer.bias.grad.flatten()]) * batch)
        layer.zero_grad()
    noise = torch.stack(draws)  # 300 x 20 draws of the noise on the sum
    assert abs(float(noise.mean())) < 4 * sigma * clip / math.sqrt(noise.numel())
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.05)
    assert dp.steps == 300 and dp.last_clipped_norms is not None and bool((dp.last_clipped_norms == 0).all())


def _moments_accountant(q: float, sigma: float, steps: int, delta: float, max_lambda: int = 32) -> float:
    """Abadi et al.'s conversion, ``min_λ (T α(λ) + log 1/δ) / λ``, with ``α(λ) = λ · RDP(λ + 1)``."""
    return min(
        (steps * lam * sampled_gaussian_rdp(q, sigma, lam + 1) + math.log(1 / delta)) / lam
        for lam in range(1, max_lambda + 1)
    )


def _rdp_by_integration(q: float, sigma: float, alpha: int) -> float:
    """``D_α((1−q)N(0,σ²) + qN(1,σ²) || N(0,σ²))`` by trapezoidal integration of ``E_μ0[(μ/μ0)^α]``."""
    z = torch.linspace(-40 * sigma, 40 * sigma + 1, 400_001, dtype=torch.float64)
    log_mu0 = -(z**2) / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
    ratio = (1 - q) + q * torch.exp((2 * z - 1) / (2 * sigma**2))
    integrand = torch.exp(log_mu0 + alpha * torch.log(ratio))
    return math.log(float(torch.trapezoid(integrand, z))) / (alpha - 1)


@pytest.mark.parametrize("alpha", [2, 8, 32])
def test_the_rdp_of_the_sampled_gaussian_matches_numerical_integration(alpha: int) -> None:
    for q, sigma in ((0.01, 1.1), (0.1, 2.0)):
        assert sampled_gaussian_rdp(q, sigma, alpha) == pytest.approx(
            _rdp_by_integration(q, sigma, alpha), rel=1e-6
        )
    assert sampled_gaussian_rdp(1.0, 2.0, alpha) == pytest.approx(alpha / 8.0)  # no sampling: the Gaussian


def test_the_accountant_reproduces_abadi_et_al_and_tightens_it() -> None:
    # Abadi et al. 2016, Sec. 3.1: q = 0.01, σ = 4, δ = 1e-5, T = 10000 gives ε ≈ 1.26 (moments accountant).
    assert _moments_accountant(0.01, 4.0, 10_000, 1e-5) == pytest.approx(1.26, abs=0.005)
    tight = RDPAccountant(0.01, 4.0).epsilon(10_000, 1e-5)
    assert 0.9 < tight < 1.26  # the conversion of Balle et al. 2020 is tighter
    # 10 epochs at q = 0.01, σ = 1.1: 1000 steps.
    acc = RDPAccountant(0.01, 1.1)
    assert acc.epsilon(1000, 1e-5) == pytest.approx(1.725, abs=0.005)
    assert _moments_accountant(0.01, 1.1, 1000, 1e-5) == pytest.approx(2.087, abs=0.005)
    assert acc.epsilon(0, 1e-5) == 0.0 and acc.epsilon(10, 1e-5) < acc.epsilon(20, 1e-5)
    assert math.isinf(RDPAccountant(0.01, 0.0).epsilon(1, 1e-5))


def test_epsilon_is_reported_after_each_update_and_resumes_from_the_checkpoint_state() -> None:
    system, dp = _system(sigma=1.0, clip=1.0)
    before = {p: p.detach().clone() for p in dp._params}
    batch = tiny_batch("classification")
    for _ in range(2):
        system.data_party.train_step(batch)
    assert dp.steps == 2 and dp.epsilon == pytest.approx(dp.accountant.epsilon(2, 1e-5)) and dp.epsilon > 0
    assert dp.epsilon_spent(1e-3) < dp.epsilon
    assert all(not torch.equal(p, before[p]) for p in dp._params)
    state = system.data_party.state_dict()
    restored, fresh = _system(sigma=1.0, clip=1.0)
    restored.data_party.load_state_dict(state)
    assert fresh.steps == 2 and fresh.epsilon == dp.epsilon
    restored.data_party.train_step(batch)
    assert fresh.epsilon == pytest.approx(dp.accountant.epsilon(3, 1e-5))


def test_a_trainable_module_other_than_linear_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"linear layers only.*head: .*embed_tokens \(Embedding\).*RMSNorm"):
        _system(setting="ht", head="full")
    with pytest.raises(ValueError, match="nothing to privatize"):
        _system(setting="ht", head="frozen")
    _system(setting="hbt", head="frozen")  # a frozen head with a LoRA tail: the tail is privatized


def test_sample_rate_is_required_and_named_in_the_config_error(tmp_path: Path) -> None:
    with pytest.raises(DefenseConfigError, match="dp_sgd: sample_rate: Field required"):
        build_defense({"name": "dp_sgd"})
    raw: dict[str, object] = run_config(tmp_path, "x", defenses=[{"name": "dp_sgd", "noise_multiplier": -1}])
    with pytest.raises(ConfigError, match="noise_multiplier"):
        parse_config(raw)


def test_a_run_privatizes_every_update_and_reports_epsilon(tmp_path: Path) -> None:
    from splitfed.run import train
    from splitfed.run.callbacks import Callback, LoopState
    from tiny import save_tiny_pretrained, write_topic_csv

    save_tiny_pretrained(tmp_path / "model")
    write_topic_csv(tmp_path / "data.csv")
    spec = {"name": "dp_sgd", "sample_rate": 8 / 96, "noise_multiplier": 1.0, "max_grad_norm": 1.0}
    raw = run_config(
        tmp_path, "run", defenses=[spec], train={"steps": 3, "eval_before": False, "grad_accum": 2}
    )
    raw["model"]["num_labels"] = 3
    reported: list[float] = []

    class Epsilon(Callback):
        def on_step(self, state: LoopState, record: dict[str, float]) -> None:
            dp = state.data_party.front.defenses[0]
            assert isinstance(dp, DPSGD) and dp.last_clipped_norms is not None
            assert dp.last_clipped_norms.shape == (8,)  # 2 micro-batches of 4: one set of examples
            reported.append(dp.epsilon)

    train(parse_config(raw), progress=False, log=lambda s: None, callbacks=[Epsilon()])
    accountant = RDPAccountant(8 / 96, 1.0)  # batches of 8: 2 micro-batches of 4
    assert reported == pytest.approx([accountant.epsilon(t, 1e-5) for t in (1, 2, 3)])


def test_the_run_fills_the_sampling_rate_and_logs_epsilon_with_every_step(tmp_path: Path) -> None:
    from splitfed.run import train
    from tiny import save_tiny_pretrained, write_topic_csv

    save_tiny_pretrained(tmp_path / "model")
    write_topic_csv(tmp_path / "data.csv")
    spec = {"name": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0}  # no sample_rate
    raw = run_config(tmp_path, "run", defenses=[spec], train={"steps": 2, "eval_before": False})
    raw["model"]["num_labels"] = 3
    result = train(parse_config(raw), progress=False, log=lambda s: None)
    cfg = parse_config(raw)
    rate = cfg.train.batch_size * cfg.train.grad_accum / result.summary["examples"]["train"]
    accountant = RDPAccountant(rate, 1.0)
    logged = [h["dp_sgd_epsilon"] for h in result.history]
    assert logged == pytest.approx([accountant.epsilon(t, 1e-5) for t in (1, 2)])
