"""``plan.json``: the per-unit allocation, its predicted cost and drop, and the uniform baseline.

See docs/formats.md for the schema. Every unit of the scan is listed explicitly: each channel group
with its ``ratio`` / ``n_remove`` (0 for none, skipped groups included with their reason) and each
Conv/Linear layer with its weight ``bits`` (32 = kept in float32).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sensplan._artifacts import file_sha256, now_iso, read_json, versions, write_json
from sensplan._errors import ArtifactError, UserInputError
from sensplan.planner._budget import Budget
from sensplan.planner._costs import METRICS, CostModel
from sensplan.planner._solver import cost_metric, solve, uniform_choice
from sensplan.sensitivity import Scan

PLAN_FORMAT = "sensplan.plan"
PLAN_SCHEMA_VERSION = 1
VARIANTS = ("planned", "uniform")


@dataclass(frozen=True)
class Plan:
    """A loaded or freshly made plan (plain data); ``variant(name)`` is one allocation."""

    data: Mapping[str, Any]
    sha256: str = ""
    path: str = ""

    def variant(self, name: str = "planned") -> Mapping[str, Any]:
        plans = self.data["plans"]
        if name not in plans or plans[name] is None:
            have = [k for k, v in plans.items() if v is not None]
            raise UserInputError(f"The plan has no {name!r} allocation; it has {', '.join(have)}.")
        return plans[name]  # type: ignore[no-any-return]

    @property
    def original(self) -> Mapping[str, float]:
        return self.data["original"]  # type: ignore[no-any-return]

    def save(self, path: str | os.PathLike[str]) -> Plan:
        return Plan(self.data, write_json(path, dict(self.data)), str(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        obj = read_json(path, PLAN_FORMAT, (PLAN_SCHEMA_VERSION,))
        for key in ("plans", "original", "scan", "model"):
            if key not in obj:
                raise ArtifactError(f"{str(path)!r} lacks the {key!r} section of a plan. Re-run `sensplan plan`.")
        for name, v in obj["plans"].items():
            if v is not None and not {"prune", "quantize", "predicted"} <= set(v):
                raise ArtifactError(f"The {name!r} allocation in {str(path)!r} lacks prune/quantize/predicted.")
        return cls(obj, file_sha256(path), str(path))


def _allocation(cm: CostModel, scan: Scan, removed: Mapping[str, int], bits: Mapping[str, int],
                ratios: Mapping[str, float], drop: float, costs: Mapping[str, float]) -> dict[str, Any]:
    prune: dict[str, Any] = {}
    for gid, g in scan.groups.items():
        entry: dict[str, Any] = {"ratio": float(ratios.get(gid, 0.0)), "n_remove": int(removed.get(gid, 0)),
                                 "channels": int(g["channels"]), "status": g["status"]}
        if g["status"] != "scanned":
            entry["reason"] = g["reason"]
        prune[gid] = entry
    quant = {layer: {"bits": int(bits.get(layer, 32))} for layer in scan.layers}
    unit_drops = {}
    for i, b in enumerate(cm.blocks):
        opt = removed.get(b.unit, 0) if b.kind == "prune" else bits.get(b.unit, 32)
        if opt in b.options:
            unit_drops[b.name] = float(cm.drop_table("drop")[i][b.options.index(opt)])
    return {"prune": prune, "quantize": quant,
            "predicted": {"drop": drop, "top1": scan.baseline["top1"] - drop,
                          **{m: costs[m] for m in METRICS},
                          **{f"{m}_fraction": costs[m] / cm.original[m] if cm.original[m] else None
                             for m in METRICS}},
            "unit_drops": unit_drops}


def check_objective(budgets: Sequence[Budget], max_drop: float | None, minimize: str | None) -> None:
    """Raise a UserInputError unless there is a budget, or a max-drop with a cost to minimise."""
    if not budgets and max_drop is None:
        raise UserInputError("Give a budget, e.g. --budget macs=0.5 or --budget size=25%, or --max-drop 0.01.")
    if max_drop is not None and not budgets and not minimize:
        raise UserInputError("With --max-drop, say which cost to minimise: --minimize size|macs|bops|params.")


def make_plan(scan: Scan, budgets: Sequence[Budget], *, max_drop: float | None = None,
              minimize: str | None = None, time_limit: float = 60.0) -> Plan:
    """Solve the allocation for ``budgets`` (or ``max_drop``) and compute the uniform baseline.

    Example: ``make_plan(Scan.load("scan.json"), [Budget.parse("macs=0.5")]).save("plan.json")``.
    """
    check_objective(budgets, max_drop, minimize)
    t0 = time.perf_counter()
    cm = CostModel(scan)
    sol = solve(cm, budgets, max_drop=max_drop, minimize=minimize, time_limit=time_limit)
    solve_seconds = time.perf_counter() - t0
    removed = {b.unit: b.options[sol.choice[i]] for i, b in enumerate(cm.blocks) if b.kind == "prune"}
    ratios = {b.unit: b.ratios[sol.choice[i]] for i, b in enumerate(cm.blocks) if b.kind == "prune"}
    bits = {b.unit: b.options[sol.choice[i]] for i, b in enumerate(cm.blocks) if b.kind == "quantize"}
    planned = _allocation(cm, scan, removed, bits, ratios, sol.predicted_drop, sol.costs)
    uni = uniform_choice(cm, budgets, max_drop=max_drop, minimize=minimize)
    uniform = None
    if uni is not None:
        uniform = _allocation(cm, scan, uni.removed, uni.layer_bits,
                              {g: uni.ratio for g in uni.removed}, uni.predicted_drop, uni.costs)
        uniform["uniform"] = {"ratio": uni.ratio, "bits": uni.bits}
    data = {
        "format": PLAN_FORMAT,
        "schema_version": PLAN_SCHEMA_VERSION,
        "created": now_iso(),
        "versions": versions(),
        "scan": {"path": scan.path, "sha256": scan.sha256 or None,
                 "baseline": dict(scan.baseline), "data": scan.data.get("data", {}).get("spec")},
        "model": dict(scan.data["model"]),
        "objective": {
            "mode": "max_drop" if max_drop is not None else "budget",
            "budgets": [b.to_dict(cm.original) for b in budgets],
            "max_drop": max_drop,
            "minimize": cost_metric(budgets, minimize) if max_drop is not None else None,
            "drop_model": "sum of per-unit drops (monotone envelope of the scan)",
        },
        "solver": {"method": "milp (scipy.optimize.milp / HiGHS)", "seconds": round(solve_seconds, 4)},
        "original": {m: cm.original[m] for m in METRICS},
        "plans": {"planned": planned, "uniform": uniform},
    }
    return Plan(data)
