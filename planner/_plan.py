"""``plan.json``: the per-unit allocation, its predicted cost and drop, and the uniform baseline.

See docs/formats.md for the schema. Every decision block of the scan is listed explicitly, with
``method: null`` where nothing is applied, and every unit a method skipped is listed with the reason.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sensplan._artifacts import file_sha256, now_iso, versions, write_json
from sensplan._errors import ArtifactError, BudgetError, UserInputError
from sensplan._metric import Metric
from sensplan._plan_format import PLAN_FORMAT, PLAN_SCHEMA_VERSION, migration_note, read_plan
from sensplan.planner._budget import Budget
from sensplan.planner._costs import CostModel, Costs, scope_weights
from sensplan.planner._solver import (
    UniformSolution,
    cost_metric,
    group_method,
    interp_drop,
    solve,
    uniform_choice,
    uniform_label,
)

#: half-width of a 95% interval in standard errors
Z95 = 1.96
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

    @property
    def metric(self) -> Metric:
        return Metric.from_dict(self.data["task"]["metric"])

    def save(self, path: str | os.PathLike[str]) -> Plan:
        """Write the file atomically; return the saved view, which carries the file's digest (use it:
        what is made from it then chains to the file)."""
        return Plan(self.data, write_json(path, dict(self.data)), str(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read and check a plan.json. A plan of an older schema_version is migrated in memory (the
        file is left as it is; a note on stderr says so, and ``data["migrated"]`` records it); the
        digest is the file's, so what is made from it chains to the file."""
        obj = read_plan(path)
        from sensplan._validate import check_plan

        problems = check_plan(obj)
        if problems:
            more = f" (and {len(problems) - 1} more: `sensplan validate` lists them)" if len(problems) > 1 else ""
            raise ArtifactError(f"{str(path)!r} is not a valid plan: {problems[0]}{more}. Re-run `sensplan "
                                f"plan`, or check it with `sensplan validate`.")
        note = migration_note(obj)
        if note:
            print(f"note: {path}: {note}", file=sys.stderr, flush=True)
        return cls(obj, file_sha256(path), str(path))


def assignments(allocation: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Method -> unit -> setting, for every block of ``allocation`` that applies a method."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for c in allocation["choices"].values():
        if c.get("method"):
            out.setdefault(c["method"], {})[c["unit"]] = dict(c["setting"])
    return out


def _allocation(cm: Costs, choice: Mapping[int, int], costs: Mapping[str, float], drop: float,
                scan: Any) -> dict[str, Any]:
    choices: dict[str, Any] = {}
    unit_drops: dict[str, float] = {}
    drops = cm.drop_table("drop")
    for i, b in enumerate(cm.blocks):
        o = b.options[choice.get(i, 0)]
        choices[b.name] = {"unit": b.unit, "axis": b.axis, "kind": b.kind, "method": o.method,
                           "setting": dict(o.setting), "label": o.label, "effect": dict(o.effect)}
        if b.kind == "group":
            choices[b.name]["channels"] = b.channels
        # the unit's predicted drop alone: its signal value through the map (the identity for drop)
        unit_drops[b.name] = cm.drop_of(float(drops[i][choice.get(i, 0)]))
    metric = scan.metric
    se = cm.predicted_se(choice)
    skipped = {m: {**v, **cm.dropped.get(m, {})} for m, v in scan.skipped().items()}
    return {"choices": choices,
            "skipped": {m: v for m, v in skipped.items() if v},
            "predicted": {"drop": drop, "drop_se": se, "drop_interval": [drop - Z95 * se, drop + Z95 * se],
                          "score": metric.after_drop(scan.baseline["score"], drop),
                          "signal_total": cm.objective(choice),  # what the map reads the drop off
                          **{m: costs[m] for m in cm.metrics},
                          **{f"{m}_fraction": costs[m] / cm.original[m] if cm.original[m] else None
                             for m in cm.metrics}},
            "unit_drops": unit_drops}


def check_objective(budgets: Sequence[Budget], max_drop: float | None, minimize: str | None) -> None:
    """Raise a UserInputError unless there is a budget, or a max-drop with a cost to minimise."""
    if not budgets and max_drop is None:
        raise UserInputError("Give a budget, e.g. --budget macs=0.5 or --budget size=25%, or --max-drop 0.01.")
    if max_drop is not None and not budgets and not minimize:
        raise UserInputError("With --max-drop, say which cost to minimise: --minimize size|macs|bops|params.")


def _check_metrics(cm: Costs, budgets: Sequence[Budget], minimize: str | None) -> None:
    for b in budgets:
        if b.metric not in cm.metrics:
            raise BudgetError(f"The budget metric {b.metric!r} is not known. Use one of "
                              f"{', '.join(cm.metrics)} (a measured metric needs its --cost-table).")
    if minimize and minimize not in cm.metrics:
        raise BudgetError(f"--minimize {minimize} is not a known metric. Use one of {', '.join(cm.metrics)}.")


def make_plan(scan: Any, budgets: Sequence[Budget], *, max_drop: float | None = None,
              minimize: str | None = None, time_limit: float = 60.0,
              cost_models: Sequence[CostModel] = (), verifier: Any = None, rounds: int = 3,
              signal: str = "auto", tie: Sequence[str] = ()) -> Plan:
    """Solve the allocation for ``budgets`` (or ``max_drop``) and compute the uniform baseline.

    ``cost_models`` adds measured cost tables (:class:`~sensplan.planner.TableCosts`) to the
    analytic costs. ``signal`` is what the solver adds up: ``"drop"`` (the task's measured drop) or
    a signal the scan recorded (``"loss"``, ``"kl"``, ``"margin"``; ``"fisher"`` for a fast scan),
    whose sum predicts the drop through a monotone map fitted on the scan's measured probes (see
    ``_signal``); ``"auto"`` (the default) is ``fisher`` for a fast scan, else ``kl`` where recorded,
    else ``drop``. With a ``verifier``
    (:class:`~sensplan.planner.Verifier`: the model and data), every plan is measured before it is
    written, the drop model is corrected and the allocation
    solved again (up to ``rounds`` solves), the uniform candidates are measured too, and the best
    measured candidate on held-out data becomes the plan (see ``_verify``). ``tie``: patterns whose
    matching units choose one option together (``"experts"``: an MoE layer's experts; see
    :func:`~sensplan.planner._costs.tied_blocks`). Example:
    ``make_plan(Scan.load("scan.json"), [Budget.parse("macs=0.5")])``.
    """
    check_objective(budgets, max_drop, minimize)
    t0 = time.perf_counter()
    cm = Costs(scan, cost_models, signal, tie)
    signal = cm.signal  # "auto" resolved
    if not any(len(b.options) > 1 for b in cm.blocks):
        skipped = [f"{unit}: {why}" for info in scan.data.get("methods", {}).values()
                   for unit, why in (info.get("skipped") or {}).items()]
        raise UserInputError(
            "The scan measured no unit, so there is nothing to plan"
            + (f" (every unit was skipped; e.g. {skipped[0][:200].rstrip('.')})" if skipped else "")
            + ". Scan with other --methods (e.g. --methods prune,weight_quant), or see each skip's reason "
              "in scan.json.")
    _check_metrics(cm, budgets, minimize)
    sol = solve(cm, budgets, max_drop=max_drop, minimize=minimize, time_limit=time_limit)
    solve_seconds = time.perf_counter() - t0
    planned = allocation(cm, sol.choice, scan)
    planned["solver"] = {"status": sol.status, "optimal": sol.optimal, "gap": sol.gap}
    uni = uniform_choice(cm, budgets, max_drop=max_drop, minimize=minimize)
    uniform = uniform_allocation(cm, uni, scan) if uni is not None else None
    data = {
        "format": PLAN_FORMAT,
        "schema_version": PLAN_SCHEMA_VERSION,
        "created": now_iso(),
        "versions": versions(),
        "scan": {"path": scan.path, "sha256": scan.sha256 or None,
                 "baseline": dict(scan.baseline), "data": scan.data.get("data", {}).get("spec"),
                 # what the plan was chosen on: apply measures outside it
                 "sample": scan.data.get("data"), "calibration": scan.data.get("calibration")},
        "model": dict(scan.data["model"]),
        "task": dict(scan.data["task"]),
        "objective": {
            "mode": "max_drop" if max_drop is not None else "budget",
            "budgets": [b.to_dict(cm.original) for b in budgets],
            "max_drop": max_drop,
            "minimize": cost_metric(budgets, minimize) if max_drop is not None else None,
            "drop_model": ("sum of per-unit drops (monotone envelope of the scan)" if cm.drop_map.identity else
                           f"monotone map of the sum of per-unit {signal} (envelope of the scan), fitted on "
                           f"the scan's measured probes"),
            "signal": signal,
            "drop_map": cm.drop_map.to_dict() if not cm.drop_map.identity else None,
            **({"tie": {"patterns": list(cm.tie),
                        "groups": [[cm.blocks[i].name for i in group] for group in cm.ties]}} if cm.ties else {}),
        },
        "cost_models": cm.describe(),
        "solver": {"method": "milp (scipy.optimize.milp / HiGHS)", "seconds": round(solve_seconds, 4),
                   "status": sol.status, "optimal": sol.optimal},
        "original": {m: cm.original[m] for m in cm.metrics},
        "scope": scope(scan),
        "plans": {"planned": planned, "uniform": uniform},
    }
    if verifier is not None:
        from sensplan.planner._verify import verify

        verify(data, cm, scan, budgets, verifier, max_drop=max_drop, minimize=minimize,
               time_limit=time_limit, rounds=rounds)
    return Plan(data)


def scope(scan: Any) -> dict[str, Any]:
    """The layers the ``bits`` metric averages over (every scanned layer the model does not leave
    out), their original weight count, and the layers left out with the reason and their weights."""
    import math

    out = {name: {"reason": v["out_of_scope"], "weights": math.prod(v["weight_shape"])}
           for name, v in scan.layers.items() if v.get("out_of_scope")}
    return {"layers": [name for name in scan.layers if name not in out], "weights": scope_weights(scan),
            "out_of_scope": out}


def allocation(cm: Costs, choice: Mapping[int, int], scan: Any) -> dict[str, Any]:
    """The plan.json allocation of ``choice`` with its predicted costs and drop (and interval)."""
    return _allocation(cm, choice, cm.evaluate(choice), cm.predicted_drop(choice), scan)


def uniform_allocation(cm: Costs, uni: UniformSolution, scan: Any) -> dict[str, Any]:
    """The plan.json allocation of a uniform candidate. An off-grid fraction of a group is written
    as its method's setting: the fraction under the method's ``setting_key`` and the exact
    ``n_remove``, the form every group method's settings take (see docs/architecture.md)."""
    out = _allocation(cm, uni.choice, uni.costs, uni.predicted_drop, scan)
    for i, b in enumerate(cm.blocks):
        if b.kind == "group":
            k = uni.removed[b.unit]
            c = out["choices"][b.name]
            if k and c.get("effect", {}).get("removed") != k:
                method = group_method(cm, i)
                key = (scan.methods.get(method) or {}).get("setting_key") or "ratio"
                c.update(method=method, setting={key: uni.ratio, "n_remove": k},
                         label=f"{method} {uni.ratio:.0%} ({k} ch)", effect={"removed": k})
                out["unit_drops"][b.name] = cm.drop_of(interp_drop(cm, i, k))
    out["predicted"]["signal_total"] = uni.signal_total  # a group between its scanned settings interpolated
    out["uniform"] = {"ratio": uni.ratio, "layer_options": uni.layer_options, "label": uniform_label(cm, uni)}
    return out
