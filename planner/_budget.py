"""Budgets: ``macs=0.5`` (a fraction of the original), ``size=25%``, ``size=2MB``, ``macs=20M``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sensplan._errors import BudgetError

#: the built-in (analytic) cost metrics; a measured cost table adds its own metric name
METRICS = ("size", "macs", "bops", "params")

_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
          "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2.0**10, "mib": 2.0**20, "gib": 2.0**30, "b": 1.0}
_RE = re.compile(r"^\s*([a-z][a-z0-9_]*)\s*(<=|=)\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(%|[a-z]*)\s*$", re.I)


@dataclass(frozen=True)
class Budget:
    """A limit on one metric: ``metric`` in METRICS, ``value`` either a ``fraction`` of the original
    model's cost (in (0, 1]) or an ``absolute`` amount (bytes for size, per-sample MACs/BOPs, count)."""

    metric: str
    value: float
    relative: bool

    def __post_init__(self) -> None:
        if not self.metric.replace("_", "").isalnum():
            raise BudgetError(f"The budget metric must be one of {', '.join(METRICS)} or the metric of a "
                              f"--cost-table. Got {self.metric!r} instead.")
        if self.relative and not 0.0 < self.value <= 1.0:
            raise BudgetError(f"A relative budget must be a fraction in the range (0.0, 1.0]. Got {self.value} "
                              f"instead. Use e.g. {self.metric}=0.5 or {self.metric}=50%.")
        if not self.relative and self.value <= 0:
            raise BudgetError(f"An absolute budget must be positive. Got {self.value} instead.")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse ``metric=value``: a value in (0, 1] or with ``%`` is a fraction of the original; a
        value above 1 or with a unit (size: B, KB, MB, KiB, MiB; counts: K, M, G) is absolute."""
        m = _RE.match(text or "")
        if not m:
            raise BudgetError(f"Cannot read the budget {text!r}. Write METRIC=VALUE with METRIC one of "
                              f"{', '.join(METRICS)}, e.g. macs=0.5, size=25%, size=2MB, macs=20M.")
        metric, _, num, unit = m.group(1).lower(), m.group(2), float(m.group(3)), m.group(4).lower()
        if unit == "%":
            return cls(metric, num / 100.0, True)
        if unit not in _UNITS:
            raise BudgetError(f"Unknown unit {m.group(4)!r} in the budget {text!r}. Use %, B, KB, MB, GB, "
                              f"KiB, MiB, GiB, K, M or G.")
        if unit == "" and num <= 1.0:
            return cls(metric, num, True)
        return cls(metric, num * _UNITS[unit], False)

    def limit(self, original: Mapping[str, float]) -> float:
        """The budget in absolute units, given the original model's costs."""
        return self.value * original[self.metric] if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}" if self.relative else f"{self.metric}={self.value:.6g}"

    def to_dict(self, original: Mapping[str, float]) -> dict[str, Any]:
        lim = self.limit(original)
        return {"metric": self.metric, "value": self.value,
                "kind": "fraction" if self.relative else "absolute",
                "absolute": lim, "fraction": lim / original[self.metric] if original[self.metric] else None}


def parse_max_drop(text: str | float) -> float:
    """A tolerated top-1 drop: ``0.01``, ``1%`` (both one percentage point)."""
    s = str(text).strip()
    try:
        v = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        raise BudgetError(f"Cannot read --max-drop {text!r}. Give a fraction such as 0.01 or a percentage "
                          f"such as 1%.") from None
    if not 0.0 <= v < 1.0:
        raise BudgetError(f"The max-drop must be a fraction of top-1 accuracy in the range [0.0, 1.0). "
                          f"Got {v} instead (1% is 0.01).")
    return v
