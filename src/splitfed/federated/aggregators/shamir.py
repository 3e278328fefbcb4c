"""Shamir secret sharing over a prime field (Shamir, 1979, "How to Share a Secret").

A secret of up to 64 bytes is the constant term of a random polynomial of degree
``threshold - 1`` over GF(2**521 - 1); share ``x`` is the polynomial at ``x`` (``x >= 1``). Any
``threshold`` shares give the secret back by Lagrange interpolation at 0; fewer reveal nothing
about it. SecAgg uses it for the clients' mask keys and self-mask seeds.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

from splitfed.federated.fedavg import AggregationError

#: The Mersenne prime 2**521 - 1 (the field of NIST P-521): larger than any 64-byte secret.
PRIME = 2**521 - 1
#: Bytes of one encoded share value.
SHARE_BYTES = 66


def split(secret: bytes, *, threshold: int, xs: Iterable[int]) -> dict[int, bytes]:
    """Shares of ``secret`` at the points ``xs`` (distinct, 1 <= x < PRIME), any ``threshold`` of
    which reconstruct it."""
    points = list(xs)
    if len(secret) > 64:
        raise ValueError(f"a secret has at most 64 bytes, got {len(secret)}")
    if not 1 <= threshold <= len(points):
        raise ValueError(f"threshold must be between 1 and the {len(points)} shares, got {threshold}")
    if len(set(points)) != len(points) or any(not 1 <= x < PRIME for x in points):
        raise ValueError(f"share points must be distinct and in [1, PRIME), got {points}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in points:
        value = 0
        for c in reversed(coefficients):
            value = (value * x + c) % PRIME
        shares[x] = value.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], *, threshold: int, secret_bytes: int, what: str) -> bytes:
    """The secret of ``secret_bytes`` bytes from at least ``threshold`` shares (point -> value).

    Raises :class:`AggregationError` (naming ``what``) with too few shares or shares that do not
    interpolate to a secret of that size (wrong or altered shares).
    """
    if len(shares) < threshold:
        raise AggregationError(
            f"{what}: {len(shares)} shares received, {threshold} needed to reconstruct (too many "
            "clients dropped out; the round cannot be unmasked)"
        )
    points = sorted(shares)[:threshold]
    values = {}
    for x in points:
        raw = shares[x]
        if len(raw) != SHARE_BYTES or not 1 <= x < PRIME:
            raise AggregationError(f"{what}: share {x} is malformed ({len(raw)} bytes)")
        values[x] = int.from_bytes(raw, "big")
        if values[x] >= PRIME:
            raise AggregationError(f"{what}: share {x} is not a field element")
    secret = 0
    for xi in points:
        numerator, denominator = 1, 1
        for xj in points:
            if xj != xi:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        secret = (secret + values[xi] * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret.bit_length() > 8 * secret_bytes:
        raise AggregationError(
            f"{what}: the shares do not reconstruct a {secret_bytes}-byte secret (altered shares)"
        )
    return secret.to_bytes(secret_bytes, "big")
