"""Budgets: ``macs=0.5`` (a fraction of the original), ``size=25%``, ``size=2MB``, ``macs=20M``,
``bits=4.5`` (mean stored bits per weight of the layers in scope, scales and zero points included),
``latency=0.6`` or ``latency=3ms`` (the metric of a measured latency table, in milliseconds)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sensplan._errors import BudgetError

#: the built-in (analytic) cost metrics; a measured cost table adds its own metric name
METRICS = ("size", "macs", "bops", "params", "bits")

_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
          "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2.0**10, "mib": 2.0**20, "gib": 2.0**30, "b": 1.0}
#: time units of a latency table's metric (its values are in milliseconds, as sensplan profile writes)
_TIME_UNITS = {"ms": 1.0, "us": 1e-3, "s": 1e3}
_RE = re.compile(r"^\s*([a-z][a-z0-9_]*)\s*(<=|=)\s*([+-]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(%|[a-z]*)\s*$",
                 re.I)
#: what an absolute amount of each built-in metric counts, and an example with a unit
_AMOUNTS = {"size": ("bytes", "size=2MB"), "macs": ("MACs", "macs=20M"), "bops": ("BOPs", "bops=2G"),
            "params": ("parameters", "params=1.5M"), "bits": ("bits per weight", "bits=4.5")}


@dataclass(frozen=True)
class Budget:
    """A limit on one metric: ``metric`` in METRICS, ``value`` either a ``fraction`` of the original
    model's cost (in (0, 1]) or an ``absolute`` amount (bytes for size, per-sample MACs/BOPs, count)."""

    metric: str
    value: float
    relative: bool
    #: the unit as typed ("" for none, "%", "mb", ...); None when built in code, not parsed
    unit: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.metric.replace("_", "").isalnum():
            raise BudgetError(f"The budget metric must be one of {', '.join(METRICS)} or the metric of a "
                              f"--cost-table. Got {self.metric!r} instead.")
        if self.relative and not 0.0 < self.value <= 1.0:
            raise BudgetError(f"A relative budget must be a fraction in the range (0.0, 1.0]. Got {self.value} "
                              f"instead. Use e.g. {self.metric}=0.5 or {self.metric}=50%.")
        if not self.relative and self.value <= 0:
            raise BudgetError(f"An absolute budget must be positive. Got {self.value} instead. Use e.g. "
                              f"{self.metric}=0.5 for half of the original.")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse ``metric=value``: a value in (0, 1] or with ``%`` is a fraction of the original; a
        value above 1 or with a unit (size: B, KB, MB, KiB, MiB; counts: K, M, G) is absolute."""
        m = _RE.match(text or "")
        if not m:
            raise BudgetError(f"Cannot read the budget {text!r}. Write METRIC=VALUE with METRIC one of "
                              f"{', '.join(METRICS)}, e.g. macs=0.5, size=25%, size=2MB, macs=20M.")
        metric, _, num, unit = m.group(1).lower(), m.group(2), float(m.group(3)), m.group(4).lower()
        if num < 0:
            raise BudgetError(f"The budget {text.strip()} is negative: a budget is the most the "
                              f"compressed model may cost. Give a fraction of the "
                              f"original, e.g. {metric}=0.5 or {metric}=50%, or a positive amount with "
                              f"a unit, e.g. {_AMOUNTS.get(metric, ('', 'size=2MB'))[1]}.")
        if unit == "%":
            return cls(metric, num / 100.0, True, unit)
        if unit in _TIME_UNITS:
            if metric in METRICS:
                raise BudgetError(f"The budget {text!r} gives {metric} in {m.group(4)}, a unit of time. Time "
                                  f"units are for a measured latency table's metric (sensplan profile), e.g. "
                                  f"latency=3ms.")
            return cls(metric, num * _TIME_UNITS[unit], False, unit)
        if unit not in _UNITS:
            raise BudgetError(f"Unknown unit {m.group(4)!r} in the budget {text!r}. Use %, B, KB, MB, GB, "
                              f"KiB, MiB, GiB, K, M or G (ms, us or s for a latency table).")
        if metric == "bits" and unit == "":  # bits per weight: always an amount (bits=4.5, bits=1)
            return cls(metric, num, False, unit)
        if unit == "" and num <= 1.0:
            return cls(metric, num, True, unit)
        return cls(metric, num * _UNITS[unit], False, unit)

    def limit(self, original: Mapping[str, float]) -> float:
        """The budget in absolute units, given the original model's costs.

        A parsed budget without a unit whose absolute value is below 1% of the original (``macs=2``:
        2 MACs) is almost surely a fraction or a factor meant otherwise: a BudgetError suggests the
        fraction instead of an infeasible plan.
        """
        if self.relative:
            return self.value * original[self.metric]
        orig = original.get(self.metric, 0.0)
        if self.unit == "" and orig > 0 and self.value < 0.01 * orig:
            what, example = _AMOUNTS.get(self.metric, ("", f"{self.metric}=0.5"))
            what = f" {what}" if what else ""
            raise BudgetError(
                f"The budget {self.metric}={self.value:g} is read as an absolute {self.value:g}{what} "
                f"(a number above 1 without % or a unit is an absolute amount), smaller than 1% of the "
                f"original model's {orig:.6g}{what}. For a fraction of the original write "
                f"{self.metric}=0.5 or {self.metric}=50%; for an absolute amount add a unit, e.g. "
                f"{example}.")
        return self.value

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}" if self.relative else f"{self.metric}={self.value:.6g}"

    def to_dict(self, original: Mapping[str, float]) -> dict[str, Any]:
        lim = self.limit(original)
        return {"metric": self.metric, "value": self.value,
                "kind": "fraction" if self.relative else "absolute",
                "absolute": lim, "fraction": lim / original[self.metric] if original[self.metric] else None}

    @staticmethod
    def check_distinct(budgets: Sequence[Budget], texts: Sequence[str] | None = None) -> None:
        """Raise a BudgetError when two budgets limit the same metric (one would silently win);
        ``texts`` are the budgets as the user typed them, for the message."""
        seen: dict[str, int] = {}
        for i, b in enumerate(budgets):
            if b.metric in seen:
                j = seen[b.metric]
                first, second = (texts[j], texts[i]) if texts is not None else (str(budgets[j]), str(b))
                raise BudgetError(f"--budget {first} and --budget {second} both limit {b.metric}. Give "
                                  f"one budget per metric.")
            seen[b.metric] = i


def parse_max_drop(text: str | float) -> float:
    """A tolerated top-1 drop: ``0.01``, ``1%`` (both one percentage point)."""
    s = str(text).strip()
    try:
        v = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        raise BudgetError(f"Cannot read --max-drop {text!r}. Give a fraction such as 0.01 or a percentage "
                          f"such as 1%.") from None
    if not 0.0 <= v < 1.0:
        raise BudgetError(f"--max-drop must be a fraction of the score in the range [0.0, 1.0), e.g. "
                          f"0.01 or 1% (one point). Got {text}.")
    return v
