"""From a planning signal to the task's drop: a monotone map fitted on the scan's own probes.

The top-1 drop of one probe on a few thousand samples has a paired standard error of 0.1-0.3
points, while the difference between two bit widths of one layer is a few hundredths: planned on
top-1, the solver ranks noise. A continuous signal (the loss increase, the KL divergence from the
original's outputs, the drop of the correct-class margin) sees those differences, with a tiny
standard error, and adds up nearly linearly over units. So with ``plan --signal NAME`` the solver
adds up the signal, and the plan's task drop is predicted from the sum through :class:`DropMap`:
the non-decreasing function of the signal that fits the scan's probes (each one unit at one
setting: its signal and its measured drop) best in least squares (isotonic regression).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from sensplan._metric import FISHER

#: the planning signal that is the task's drop itself (the map is the identity)
DROP = "drop"
#: the default: ``fisher`` for a fast scan, else ``kl`` where the scan recorded it, else ``drop``
AUTO = "auto"


def isotonic(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The non-decreasing least-squares fit of ``y`` on ``x`` (pool adjacent violators): its knots
    ``(xs, fs)``, one per distinct ``x``, ``xs`` increasing."""
    xs, blocks = _pooled(x, y)
    fs = np.concatenate([np.full(int(n), m) for m, _, n, _ in blocks])
    return xs, fs


def centred_isotonic(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Centred isotonic regression (Oron and Flournoy, 2017): one knot per block that pool adjacent
    violators pooled, at the block's mean ``x`` and its mean ``y``; between knots, linear. Where
    :func:`isotonic` is flat over a pooled block, this keeps rising through it: a map of the
    signal to the drop has no plateau on which a larger total predicts the same drop."""
    _, blocks = _pooled(x, y)
    return np.array([sx / w for _, w, _, sx in blocks]), np.array([m for m, _, _, _ in blocks])


def _pooled(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, list[list[float]]]:
    """The distinct ``x`` (increasing) and the blocks of pool adjacent violators over them, each
    ``[mean y, weight (points), distinct x values, sum of the points' x]``."""
    order = np.argsort(np.asarray(x, dtype=float), kind="stable")
    xv, yv = np.asarray(x, dtype=float)[order], np.asarray(y, dtype=float)[order]
    xs, first = np.unique(xv, return_index=True)
    counts = np.diff(np.append(first, len(xv)))
    means = np.add.reduceat(yv, first) / counts
    blocks: list[list[float]] = []
    for xi, m, w in zip(xs, means, counts, strict=True):
        blocks.append([float(m), float(w), 1.0, float(xi * w)])
        # ties pool too: the least-squares fit is the same, and the centred fit gets no flat piece
        while len(blocks) > 1 and blocks[-2][0] >= blocks[-1][0]:
            m2, w2, n2, s2 = blocks.pop()
            m1, w1, n1, s1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2, s1 + s2])
    return xs, blocks


@dataclass(frozen=True)
class DropMap:
    """A non-decreasing map from a total of ``signal`` to the task's drop, piecewise linear between
    its ``knots`` (signal, drop), 0 at 0, and beyond the last knot continued with the slope from the
    origin to it (sums of many units go past every single probe). The knots are the centred
    isotonic fit (:func:`centred_isotonic`): no plateau, so a correction that adds to a plan's total
    adds to its predicted drop. The identity for ``drop``."""

    signal: str
    knots: tuple[tuple[float, float], ...] = ()

    @classmethod
    def fit(cls, signal: str, points: Iterable[tuple[float, float]]) -> DropMap:
        """Fitted on (signal, drop) points: one per probe. Negative values count as 0 (a probe
        that helped); the point (0, 0) anchors the map (no compression, no drop)."""
        if signal == DROP:
            return cls(DROP)
        pts = [(max(0.0, float(s)), max(0.0, float(d))) for s, d in points]
        xs, fs = centred_isotonic([0.0, *(p[0] for p in pts)], [0.0, *(p[1] for p in pts)])
        fs = np.maximum.accumulate(np.maximum(fs, 0.0))
        # anchored at the origin: a block that pooled it has its knot further right
        knots = [(0.0, 0.0), *((float(a), float(b)) for a, b in zip(xs, fs, strict=True) if a > 0.0)]
        return cls(signal, tuple(knots))

    @property
    def identity(self) -> bool:
        return self.signal == DROP

    def __call__(self, total: float) -> float:
        """The predicted drop at a signal ``total``."""
        if self.identity:
            return float(total)
        xs, fs = self._arrays()
        t = max(0.0, float(total))
        if t <= xs[-1]:
            return float(np.interp(t, xs, fs))
        return float(fs[-1] + self._slope() * (t - xs[-1]))

    def inverse(self, drop: float) -> float:
        """The largest signal total whose predicted drop is at most ``drop`` (for a max-drop)."""
        if self.identity:
            return float(drop)
        xs, fs = self._arrays()
        if drop >= fs[-1]:
            slope = self._slope()
            return float(xs[-1] + (drop - fs[-1]) / slope) if slope > 0 else float("inf")
        above = int(np.searchsorted(fs, drop, side="right"))  # first knot with a larger drop
        if above == 0:
            return 0.0
        x0, x1, f0, f1 = xs[above - 1], xs[above], fs[above - 1], fs[above]
        return float(x0 + (x1 - x0) * (drop - f0) / (f1 - f0)) if f1 > f0 else float(x1)

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.array([k[0] for k in self.knots]), np.array([k[1] for k in self.knots])

    def _slope(self) -> float:
        xs, fs = self._arrays()
        return float(fs[-1] / xs[-1]) if xs[-1] > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {"signal": self.signal, "knots": [list(k) for k in self.knots]}


__all__ = ["AUTO", "DROP", "FISHER", "DropMap", "centred_isotonic", "isotonic"]
