"""Robustness margins of discrete decisions (the C++ side computes in float32), and their bookkeeping."""

import math
from typing import List


MARGIN = 1e-4  # smallest accepted non-zero gap between scores at a discrete decision
SINKHORN_STOP_MARGIN = 1e-2  # smallest accepted relative gap |err - tolerance| / tolerance
MAX_ATTEMPTS = 64


class Decisions:
    """Collects the smallest non-zero score gap at any discrete decision and counts ties."""

    def __init__(self):
        self.min_gap = math.inf
        self.ties_select = 0  # tokens where an exact tie straddled the top-k boundary
        self.ties_order = 0   # tokens where an exact tie decided the order of chosen ids
        self.dropped = 0
        self.near_bounds = 0  # threshold decisions (top-p cumsum, Sinkhorn stop) too close

    def bound(self, value: float, limit: float, margin: float = MARGIN) -> None:
        """A `value >= limit` / `value < limit` decision; |value - limit| < margin
        (equality included) counts as a near tie."""
        if abs(value - limit) < margin:
            self.near_bounds += 1

    def gap(self, a: float, b: float) -> None:
        if a != b:
            self.min_gap = min(self.min_gap, abs(a - b))

    def rank(self, scores: List[float], k: int, candidates=None, ordered=True,
             count_ties=False) -> List[int]:
        """Top-k of `candidates` (default: all) by descending score, ties -> lower index.

        Records the gaps that decide the result: the boundary gap (k-th vs (k+1)-th)
        and, if `ordered`, the gaps between consecutive chosen entries."""
        cand = range(len(scores)) if candidates is None else candidates
        order = sorted(cand, key=lambda i: (-scores[i], i))
        top = [scores[i] for i in order[:k + 1]]
        if len(top) > k:
            self.gap(top[k - 1], top[k])
        if ordered:
            for a, b in zip(top[:k], top[1:k]):
                self.gap(a, b)
        if count_ties:
            if len(top) > k and top[k - 1] == top[k]:
                self.ties_select += 1
            if any(a == b for a, b in zip(top[:k], top[1:k])):
                self.ties_order += 1
        return order[:k]

    def clean(self) -> bool:
        return self.min_gap >= MARGIN and self.near_bounds == 0
