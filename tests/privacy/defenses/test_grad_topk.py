"""Gradient sparsification: exactly k entries leave per gradient, and what stays behind is carried."""

from __future__ import annotations

import math

import pytest
import torch

from splitfed.privacy.defenses import DefenseConfigError, build_defense
from splitfed.privacy.defenses.grad_topk import GradientSparsification
from splitfed.split.front import FrontContext
from tiny import tiny_batch

TRAIN = FrontContext("train")


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.37, 1.0])
def test_exactly_the_k_largest_entries_are_sent(fraction: float) -> None:
    torch.manual_seed(0)
    topk = GradientSparsification(fraction=fraction, error_feedback=False)
    grad = torch.randn(3, 9, 32)
    sent = topk.on_gradients(grad, TRAIN)
    k = math.ceil(fraction * grad.numel())
    assert int((sent != 0).sum()) == k
    kept = sent != 0
    torch.testing.assert_close(sent[kept], grad[kept])  # sent entries are unchanged
    if k < grad.numel():
        assert float(grad[kept].abs().min()) >= float(grad[~kept].abs().max())  # and the largest
    assert topk.residual is None


def test_the_residual_carries_so_that_nothing_is_lost_over_steps() -> None:
    torch.manual_seed(0)
    topk = build_defense({"name": "grad_topk", "fraction": 0.05})
    assert isinstance(topk, GradientSparsification)
    raw = [torch.randn(3, 9, 32) for _ in range(6)]
    sent = [topk.on_gradients(g, TRAIN) for g in raw]
    assert topk.residual is not None and float(topk.residual.abs().sum()) > 0
    torch.testing.assert_close(sum(sent) + topk.residual, sum(raw), atol=1e-5, rtol=0)
    # The second step sends the largest entries of its gradient plus the first step's residual.
    first_residual = raw[0] - sent[0]
    again = GradientSparsification(fraction=0.05)
    again.on_gradients(raw[0], TRAIN)
    expected = raw[1] + first_residual
    kept = again.on_gradients(raw[1], TRAIN) != 0
    assert float(expected[kept].abs().min()) >= float(expected[~kept].abs().max())


def test_a_residual_of_another_shape_is_carried_where_it_overlaps() -> None:
    topk = GradientSparsification(fraction=0.5)
    topk.residual = torch.ones(2, 4, 3)  # left by a batch of 2 rows, 4 positions
    sent = topk.on_gradients(torch.zeros(3, 2, 3), TRAIN)  # 3 rows, 2 positions: 12 entries overlap
    assert float(sent.sum()) == 9.0  # k = 9 of 18 entries, all from the carried residual
    assert topk.residual is not None and topk.residual.shape == (3, 2, 3)
    assert float(topk.residual.sum()) == 3.0  # the other 3 carried ones wait; positions 2-3 are dropped
    assert float(sent[2].abs().sum() + topk.residual[2].abs().sum()) == 0.0  # row 2 had no residual


def test_keeps_the_dtype_and_sparsifies_what_the_data_party_returns(split_system) -> None:  # type: ignore[no-untyped-def]
    topk = GradientSparsification(fraction=0.2)
    grad = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    assert topk.on_gradients(grad, TRAIN).dtype == torch.bfloat16
    system = split_system([{"name": "grad_topk", "fraction": 0.1}])
    returned: list[torch.Tensor] = []
    send = system.channel.submit

    def spy(message):  # type: ignore[no-untyped-def]
        if message.kind == "backward":
            returned.append(message.tensors["grad"])
        return send(message)

    system.channel.submit = spy  # type: ignore[method-assign]
    system.data_party.train_step(tiny_batch("classification"))
    assert len(returned) == 1
    assert int((returned[0] != 0).sum()) == math.ceil(0.1 * returned[0].numel())


def test_bad_parameters_name_the_key_and_the_range() -> None:
    with pytest.raises(DefenseConfigError, match="fraction: Input should be greater than 0"):
        build_defense({"name": "grad_topk", "fraction": 0})
    with pytest.raises(DefenseConfigError, match="fraction: Input should be less than or equal to 1"):
        build_defense({"name": "grad_topk", "fraction": 2})


def test_the_fast_top_k_of_a_large_tensor_selects_exactly_what_topk_does() -> None:
    from splitfed.privacy.defenses.grad_topk import kth_largest_magnitude, sparsify

    g = torch.Generator().manual_seed(0)
    flat = torch.randn(2**19 + 7, generator=g)
    for k in (50, 5_000, 100_000, 400_000):
        exact = flat.abs().topk(k)
        assert kth_largest_magnitude(flat, k) == (exact.values[-1], k)
        residual = torch.empty_like(flat)
        sent = sparsify(flat, k, residual=residual)
        assert set(sent.nonzero().squeeze(1).tolist()) == set(exact.indices.tolist())
        torch.testing.assert_close(sent + residual, flat, atol=0, rtol=0)
        owned = flat.clone()
        torch.testing.assert_close(sparsify(owned, k, in_place=True), sent, atol=0, rtol=0)
        torch.testing.assert_close(owned, residual, atol=0, rtol=0)


def test_ties_at_the_threshold_still_send_exactly_k() -> None:
    from splitfed.privacy.defenses.grad_topk import sparsify

    for n in (1_000, 2**19):
        flat = torch.ones(n)
        flat[: n // 4] = 3.0
        k = n // 2  # a quarter at 3.0, then a quarter of the ties at 1.0
        residual = torch.empty_like(flat)
        sent = sparsify(flat, k, residual=residual)
        assert int((sent != 0).sum()) == k and float(sent.sum()) == 3.0 * (n // 4) + (k - n // 4)
        torch.testing.assert_close(sent + residual, flat, atol=0, rtol=0)


def test_a_handed_over_gradient_carries_what_is_sent_and_a_callers_own_is_left_alone() -> None:
    torch.manual_seed(0)
    raw = [torch.randn(4, 16, 8192) for _ in range(3)]  # 2**19 entries: the large-tensor path
    mine, handed = GradientSparsification(fraction=0.1), GradientSparsification(fraction=0.1)
    owned = FrontContext("train", owns_gradient=True)
    for g in raw:
        kept = g.clone()
        expected = mine.on_gradients(g, TRAIN)
        torch.testing.assert_close(g, kept, atol=0, rtol=0)  # not the hook's: unchanged
        given = g.clone()
        sent = handed.on_gradients(given, owned)
        torch.testing.assert_close(sent, expected, atol=0, rtol=0)
    # From the second step on, what is sent lives in the storage of the gradient handed over.
    assert sent.data_ptr() == given.data_ptr()
    assert handed.residual is not None and mine.residual is not None
    torch.testing.assert_close(handed.residual, mine.residual, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["spread", "ties", "mostly_zero", "band_too_high", "band_too_low"])
def test_summing_and_sparsifying_in_one_pass_selects_what_two_passes_do(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from splitfed.privacy.defenses import grad_topk
    from splitfed.privacy.defenses.grad_topk import accumulate_and_sparsify, sparsify

    g = torch.Generator().manual_seed(0)
    n = 2**19 + 3  # above the prefilter size: the one-pass path
    carry, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    if case == "ties":  # the threshold falls among many equal sums
        carry.fill_(0.5)
        grad.fill_(0.5)
        grad[: n // 8] = 2.0
    elif case == "mostly_zero":  # the threshold is 0: the sampled band's low end is 0
        carry.zero_()
        grad[n // 20 :] = 0.0
    elif case.startswith("band_too"):  # the band misses the threshold: the sum is restored, searched exactly
        centre = (
            3.5 if case == "band_too_high" else 0.15
        )  # a band [3, 4] holds too few; [0.1, 0.2] too many above it
        monkeypatch.setattr(
            grad_topk, "_sampled_rank", lambda sample, q, side: sample.new_tensor(centre + side * centre / 7)
        )
    k = n // 10
    before = carry.clone(), grad.clone()
    expected_carry = carry + grad
    expected = sparsify(expected_carry, k, in_place=True)
    out = torch.full((n,), float("nan"))
    accumulate_and_sparsify(carry, grad, k, out=out)
    assert int((out != 0).sum()) == int((expected != 0).sum())
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(carry, expected_carry, atol=0, rtol=0)
    # ``out`` may be the gradient itself: each chunk is read before it is written.
    carry2, grad2 = before[0].clone(), before[1].clone()
    accumulate_and_sparsify(carry2, grad2, k, out=grad2)
    torch.testing.assert_close(grad2, out, atol=0, rtol=0)


@pytest.mark.parametrize("fraction", [0.1, 1.0])
@pytest.mark.parametrize("handed_over", [True, False])
def test_the_one_pass_steady_state_sends_what_sparsifying_the_sum_does(
    fraction: float, handed_over: bool
) -> None:
    from splitfed.privacy.defenses.grad_topk import sparsify

    torch.manual_seed(0)
    topk, residual = GradientSparsification(fraction=fraction), torch.zeros(4 * 16 * 8192)
    for _ in range(3):
        grad = torch.randn(4, 16, 8192)  # 2**19 entries: the large-tensor path
        total = residual + grad.view(-1)
        k = math.ceil(fraction * total.numel())
        expected = sparsify(total, k, in_place=True)
        residual = total
        kept = grad.clone()
        sent = topk.on_gradients(grad, FrontContext("train", owns_gradient=handed_over))
        if not handed_over:
            torch.testing.assert_close(grad, kept, atol=0, rtol=0)
        assert int((sent != 0).sum()) == k
        torch.testing.assert_close(sent.view(-1), expected, atol=0, rtol=0)
        assert topk.residual is not None
        torch.testing.assert_close(topk.residual.view(-1), residual, atol=0, rtol=0)


@pytest.mark.parametrize("n", [3 * 9 * 32, 4 * 16 * 8192])  # the small path and the one-pass path
def test_a_non_finite_gradient_does_not_spoil_the_residual_of_later_steps(n: int) -> None:
    torch.manual_seed(0)
    topk = GradientSparsification(fraction=0.1)
    topk.on_gradients(torch.randn(n), TRAIN)
    bad = torch.randn(n)
    bad[:: n // 5] = float("nan")
    bad[1] = float("inf")
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        topk.on_gradients(bad, TRAIN)
    assert topk.residual is not None and bool(torch.isfinite(topk.residual).all())
    later = topk.on_gradients(torch.randn(n), TRAIN)
    assert bool(torch.isfinite(later).all()) and int((later != 0).sum()) == math.ceil(0.1 * n)
