"""``Metric``: what a task's score is called, its unit, and which direction is better.

The sign of a *drop* is defined here once: positive means the model got worse, whatever the
direction of the score (top-1 falls, perplexity rises).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: the planning signal ``scan --fast`` records: the Fisher estimate of the KL divergence (nats)
FISHER = "fisher"


@dataclass(frozen=True)
class Metric:
    """A score's ``name`` (e.g. "top1"), whether ``higher_is_better``, and its ``unit``.

    Example: ``Metric("top1", True, "fraction").drop(0.9, 0.85) == 0.05`` (approximately).
    """

    name: str
    higher_is_better: bool = True
    unit: str = "fraction"

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"The 'name' parameter of Metric must be a non-empty string. Got {self.name!r}.")

    def drop(self, baseline: float, score: float) -> float:
        """How much worse ``score`` is than ``baseline`` (positive = worse)."""
        return baseline - score if self.higher_is_better else score - baseline

    def after_drop(self, baseline: float, drop: float) -> float:
        """The score a ``drop`` from ``baseline`` leaves."""
        return baseline - drop if self.higher_is_better else baseline + drop

    def format_drop(self, v: float) -> str:
        """A drop as people read it: points for a fraction (``0.0123`` -> ``"1.23 pt"``), else the
        value in the metric's unit (``"0.0123 nats/token"``)."""
        if self.unit == "fraction":
            return f"{100 * v:.2f} pt"
        return f"{v:.4g} {self.unit}".rstrip()

    def format_score(self, v: float) -> str:
        """A score as people read it: percent for a fraction (``0.9123`` -> ``"91.23%"``), else the
        value in the metric's unit (``"12.3 ppl"``)."""
        if self.unit == "fraction":
            return f"{100 * v:.2f}%"
        return f"{v:.4g} {self.unit}".rstrip()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "higher_is_better": self.higher_is_better, "unit": self.unit}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Metric:
        return cls(str(d["name"]), bool(d.get("higher_is_better", True)), str(d.get("unit", "")))


TOP1 = Metric("top1", True, "fraction")
