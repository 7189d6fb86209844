"""The XPD reward formula: pure integer arithmetic, no I/O.

Epochs
    Epoch ``n`` is the half-open interval ``[n*L, (n+1)*L)`` of Unix time, ``L`` =
    ``XPANDO_PAYOUT_EPOCH_S``. A contribution accrues into the epoch its task was recorded in.

Points
    Every contribution that was scored (status ``ok``, quality > 0) accrues
    ``quality_ppm = round(quality * 10^6)`` (an integer; quality is the Mother Core's score in
    [0, 1]). At the epoch's close a node's points are

        points(node) = floor( sum(quality_ppm) * R(node) * P(node) )
        R = (1 - rho) + rho * reputation     reputation in [0, 1]
        P = 1 / (1 + pi * price)             price >= 0, in XPD per answer
        rho = XPANDO_PAYOUT_REPUTATION_WEIGHT, pi = XPANDO_PAYOUT_PRICE_WEIGHT

    so a node with full reputation keeps all its points, a node with none keeps ``1 - rho`` of
    them, and with pi > 0 the cheaper of two equally good answers earns more. Until nodes carry
    a reputation and a price (the signed-identity issue), both are neutral: reputation 1, price 0.
    R and P are computed as exact fractions, so the points are the same on every machine.

Split
    The epoch's emission ``E`` (``XPANDO_PAYOUT_EMISSION`` base units) is split in proportion
    to points with the largest-remainder method: each node gets ``floor(E * p_i / sum(p))`` and
    the units left over go one each to the largest remainders (ties: node id), so the shares are
    integers that sum to exactly ``E``. An epoch in which nobody earned points pays nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

PPM = 1_000_000


def epoch_of(unix_s: float, epoch_s: int) -> int:
    return int(unix_s // epoch_s)


def epoch_bounds(epoch: int, epoch_s: int) -> tuple[int, int]:
    """(start, end) in Unix seconds: the epoch is ``start <= t < end``."""
    return epoch * epoch_s, (epoch + 1) * epoch_s


def quality_ppm(quality: float) -> int:
    return max(0, min(PPM, round(quality * PPM)))


@dataclass(frozen=True)
class RewardWeights:
    reputation_weight: float = 0.5  # rho
    price_weight: float = 0.0  # pi


def multiplier(weights: RewardWeights, *, reputation: float = 1.0, price: float = 0.0) -> Fraction:
    """R * P as an exact fraction (floats in settings are turned into exact rationals once)."""
    rho = Fraction(weights.reputation_weight).limit_denominator(PPM)
    pi = Fraction(weights.price_weight).limit_denominator(PPM)
    rep = Fraction(max(0.0, min(1.0, reputation))).limit_denominator(PPM)
    pr = Fraction(max(0.0, price)).limit_denominator(PPM)
    return ((1 - rho) + rho * rep) / (1 + pi * pr)


def node_points(quality_ppm_sum: int, factor: Fraction) -> int:
    return int(quality_ppm_sum * factor)  # floor for non-negative values


def split(emission: int, points: Mapping[str, int]) -> dict[str, int]:
    """Largest-remainder split of ``emission`` by ``points``; the shares sum to ``emission``."""
    if emission < 0:
        raise ValueError("emission must be >= 0")
    if any(p < 0 for p in points.values()):
        raise ValueError("points must be >= 0")
    total = sum(points.values())
    if total == 0 or emission == 0:
        return {node: 0 for node in points}
    shares: dict[str, int] = {}
    remainders: list[tuple[int, str]] = []
    for node, p in points.items():
        q, r = divmod(emission * p, total)
        shares[node] = q
        remainders.append((r, node))
    left = emission - sum(shares.values())
    # Largest remainder first; equal remainders in node-id order (deterministic).
    for _, node in sorted(remainders, key=lambda rn: (-rn[0], rn[1]))[:left]:
        shares[node] += 1
    return shares
