"""Rényi-DP accounting of the sampled Gaussian mechanism, shared by DP-SGD and client-level DP.

Rényi differential privacy (Mironov 2017, "Rényi Differential Privacy", CSF) of the sampled
Gaussian mechanism at integer orders (Mironov, Talwar & Zhang 2019, "Rényi Differential Privacy of
the Sampled Gaussian Mechanism", Sec. 3.3), composed linearly over steps and converted to (ε, δ)
with the bound of Balle et al. 2020 ("Hypothesis Testing Interpretations and Renyi Differential
Privacy", AISTATS, Thm. 21).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: RDP orders the accountant minimizes over (integers: the binomial expansion is exact there).
DEFAULT_ORDERS: tuple[int, ...] = tuple(range(2, 256))


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def sampled_gaussian_rdp(sample_rate: float, noise_multiplier: float, order: int) -> float:
    """RDP ε(α) of one step of the sampled Gaussian mechanism at integer order ``α >= 2``.

    Each example enters the batch independently with probability ``q = sample_rate`` and the sum
    of the (clipped, sensitivity 1) contributions gets ``N(0, σ²)`` noise. For integer ``α``
    (Mironov, Talwar & Zhang 2019, Sec. 3.3)::

        A_α = Σ_{k=0..α} C(α, k) (1 − q)^(α−k) q^k exp((k² − k) / (2σ²)),   ε(α) = log(A_α) / (α − 1)

    computed in log space. ``q = 1`` is the plain Gaussian mechanism, ``α / (2σ²)``.
    """
    q, sigma, alpha = float(sample_rate), float(noise_multiplier), int(order)
    if alpha < 2:
        raise ValueError(f"integer RDP orders start at 2, got {order}")
    if not 0 <= q <= 1:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
    if q == 0:
        return 0.0
    if sigma <= 0:
        return math.inf
    if q == 1:
        return alpha / (2.0 * sigma**2)
    log_a = -math.inf
    log_q, log_1q = math.log(q), math.log1p(-q)
    for k in range(alpha + 1):
        log_binom = math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        term = log_binom + k * log_q + (alpha - k) * log_1q + (k * k - k) / (2.0 * sigma**2)
        log_a = _log_add(log_a, term)
    return log_a / (alpha - 1)


def rdp_to_epsilon(rdp: Sequence[float], orders: Sequence[int], delta: float) -> tuple[float, int]:
    """The smallest ε, and its order, of a mechanism with RDP ``rdp[i]`` at ``orders[i]``, at ``delta``.

    ``ε = rdp + log((α − 1)/α) − (log δ + log α)/(α − 1)`` (Balle et al. 2020, Thm. 21), tighter
    than the original ``rdp + log(1/δ)/(α − 1)`` (Mironov 2017, Prop. 3), minimized over orders.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    best, best_order = math.inf, int(orders[0])
    for r, alpha in zip(rdp, orders, strict=True):
        eps = r + math.log1p(-1.0 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        if eps < best:
            best, best_order = eps, int(alpha)
    return max(best, 0.0), best_order


class RDPAccountant:
    """Privacy spent by ``steps`` compositions of the sampled Gaussian mechanism.

    Parameters
    ----------
    sample_rate : float
        ``q``: the probability that an example is in one step's batch.
    noise_multiplier : float
        ``σ``: noise standard deviation in units of the clipping norm.
    orders : Sequence[int], default 2..255
        Integer RDP orders to minimize over.
    """

    def __init__(
        self, sample_rate: float, noise_multiplier: float, orders: Sequence[int] = DEFAULT_ORDERS
    ) -> None:
        self.sample_rate, self.noise_multiplier = float(sample_rate), float(noise_multiplier)
        self.orders = tuple(int(a) for a in orders)
        #: One step's RDP at each order (composition adds them: RDP composes linearly).
        self.step_rdp = [
            sampled_gaussian_rdp(self.sample_rate, self.noise_multiplier, a) for a in self.orders
        ]

    def epsilon(self, steps: int, delta: float) -> float:
        """ε of ``steps`` steps at ``delta`` (0 for no step, ``inf`` without noise)."""
        if steps <= 0:
            return 0.0
        return rdp_to_epsilon([steps * r for r in self.step_rdp], self.orders, delta)[0]
