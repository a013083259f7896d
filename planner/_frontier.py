"""The Pareto frontier of one cost: the planned and the uniform allocation at a sweep of budgets,
predicted at every budget, applied and measured at a few (``sensplan frontier``).

:func:`make_frontier` solves ``points`` budgets of one metric with :func:`make_plan` (the plan as
``sensplan plan --no-verify`` writes it, uniform baseline included), evenly spaced in cost from the
cheapest reachable cost up to one step under the original (:func:`sweep_budgets`).
:func:`measure_frontier` applies the planned and the uniform allocation of some points as the
executor does without fine-tuning and measures their score and costs on data no point was chosen
on. :meth:`Frontier.save` writes ``frontier.json``, ``frontier.png`` and every point's whole plan as
``points/NN/plan.json`` (``sensplan apply --plan`` takes it).

Solving needs numpy and scipy only; measuring imports torch and plotting matplotlib, when called.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

from sensplan._artifacts import atomic_write_bytes, now_iso, read_json, versions, write_json
from sensplan._errors import ArtifactError, UserInputError
from sensplan._metric import Metric
from sensplan._tables import FRONTIER_FORMAT, FRONTIER_SCHEMA_VERSION
from sensplan.planner._budget import Budget
from sensplan.planner._costs import CostModel, Costs, option_key
from sensplan.planner._plan import VARIANTS, Z95, Plan, make_plan
from sensplan.planner._solver import min_cost

if TYPE_CHECKING:
    from sensplan.planner._verify import Verifier
    from sensplan.sensitivity import EvalSet
    from sensplan.sensitivity.tasks import Task, TaskResult

#: how the budgets of a sweep are spaced (``spacing``), in words
SPACINGS = {
    "log": "evenly on a log scale: budget i = cheapest * (original / cheapest) ** (i / points), i = 0 .. points - 1",
    "linear": "evenly in cost: budget i = cheapest + i * (original - cheapest) / points, i = 0 .. points - 1",
}


def sweep_budgets(cheapest: float, original: float, points: int, spacing: str = "log") -> list[float]:
    """``points`` budgets from the ``cheapest`` reachable cost itself up to one step under the
    ``original`` (which needs no plan), in the arguments' unit, evenly spaced:

    - ``"log"`` (the default): on a log scale, ``cheapest * (original / cheapest) ** (i / points)``
      for ``i = 0 .. points - 1``: each budget a fixed factor above the last. Compression costs span
      orders of magnitude (2-bit weights with pruning reach under 1% of the original size) and the
      drop changes most near the cheapest end, where even steps in cost would leave one point.
    - ``"linear"``: ``cheapest + i * (original - cheapest) / points``.

    Example: ``sweep_budgets(1.0, 16.0, 4) == [1.0, 2.0, 4.0, 8.0]``;
    ``sweep_budgets(10.0, 100.0, 3, "linear") == [10.0, 40.0, 70.0]``.
    """
    if spacing not in SPACINGS:
        raise UserInputError(f"The 'spacing' parameter must be one of {', '.join(SPACINGS)}. Got {spacing!r} instead.")
    if spacing == "linear":
        step = (original - cheapest) / points
        return [cheapest + i * step for i in range(points)]
    if cheapest <= 0:
        raise UserInputError(f"A sweep evenly spaced on a log scale starts at a cost above 0, but the cheapest plan "
                             f"costs {cheapest:.6g}. Sweep with --spacing linear.")
    return [cheapest * (original / cheapest) ** (i / points) for i in range(points)]


def measured_points(points: int, measure: int) -> list[int]:
    """Which of ``points`` swept budgets (index 0 the tightest) to apply and measure: ``measure``
    of them spread evenly over the sweep, index ``floor(i * (points - 1) / (measure - 1) + 0.5)``
    for ``i = 0 .. measure - 1``, so the tightest and the loosest budget are always measured. One
    alone is the tightest (where the allocations differ most); 0 measures none.
    Example: ``measured_points(8, 3) == [0, 4, 7]``."""
    if not 0 <= measure <= points:
        raise UserInputError(f"The 'measure' parameter must be an integer in the range [0, {points}] (the "
                             f"points of the sweep). Got {measure} instead.")
    if measure <= 1:
        return list(range(measure))
    return [math.floor(i * (points - 1) / (measure - 1) + 0.5) for i in range(measure)]


@dataclass(frozen=True)
class Frontier:
    """A frontier (plain data, ``frontier.json``'s content) and each point's plan (``plans``, in
    the order of ``data["points"]``; empty for a loaded frontier). See docs/formats.md."""

    data: Mapping[str, Any]
    plans: tuple[Plan, ...] = ()
    path: str = ""

    #: the files :meth:`save` writes besides the points' plans
    FILES: ClassVar[tuple[str, ...]] = ("frontier.json", "frontier.png")

    @staticmethod
    def plan_file(index: int) -> str:
        """Where point ``index``'s plan goes, relative to the output directory."""
        return f"points/{index:02d}/plan.json"

    @property
    def metric(self) -> str:
        return str(self.data["metric"])

    def save(self, out_dir: str | os.PathLike[str]) -> Frontier:
        """Write ``points/NN/plan.json`` (each point's whole plan), then ``frontier.json`` (with each
        plan's path and sha256) and ``frontier.png`` into ``out_dir``; a previous sweep's points past
        this one's are removed. Returns the saved view."""
        if len(self.plans) != len(self.data["points"]):
            raise UserInputError("Only a frontier made by make_frontier can be saved (a loaded one has no plans).")
        out = Path(out_dir)
        points, plans = [], []
        for p, plan in zip(self.data["points"], self.plans, strict=True):
            rel = self.plan_file(int(p["index"]))
            saved = plan.save(out / rel)
            plans.append(saved)
            points.append({**p, "plan": {"path": rel, "sha256": saved.sha256}})
        _remove_stale_points(out, {str(Path(p["plan"]["path"]).parent.name) for p in points})
        data = {**self.data, "points": points}
        write_json(out / "frontier.json", data)
        atomic_write_bytes(out / "frontier.png", plot_frontier(data))
        return Frontier(data, tuple(plans), str(out / "frontier.json"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Frontier:
        """Read ``frontier.json`` (its plans stay on disk, under ``points/``)."""
        if not Path(path).is_file():
            raise ArtifactError(f"The frontier file {str(path)!r} does not exist. Check the path, or create "
                                f"it with `sensplan frontier`.")
        obj = read_json(path, FRONTIER_FORMAT, (FRONTIER_SCHEMA_VERSION,))
        problems = _problems(obj)
        if problems:
            raise ArtifactError(f"{str(path)!r} is not a valid frontier: {problems[0]}. Re-run "
                                f"`sensplan frontier`.")
        return cls(obj, (), str(path))


def _problems(obj: Mapping[str, Any]) -> list[str]:
    """What a reader of frontier.json relies on, where it is missing."""
    out = []
    metric = obj.get("metric")
    if not isinstance(metric, str) or metric not in (obj.get("original") or {}):
        out.append(f"its metric {metric!r} has no original cost")
    points = obj.get("points")
    if not isinstance(points, list) or len(points) < 2:
        out.append("it holds fewer than two points")
        return out
    for i, p in enumerate(points):
        try:
            float(p["budget"]["absolute"])
            float(p["planned"]["predicted"]["drop"])
        except (KeyError, TypeError, ValueError):
            out.append(f"point {i} has no budget or no predicted drop")
    return out


def _remove_stale_points(out: Path, keep: set[str]) -> None:
    """A previous, longer sweep's ``points/NN/plan.json`` would read as part of this one."""
    root = out / "points"
    if not root.is_dir():
        return
    for d in root.iterdir():
        if d.is_dir() and d.name.isdigit() and d.name not in keep:
            (d / "plan.json").unlink(missing_ok=True)
            if not any(d.iterdir()):
                d.rmdir()


def make_frontier(scan: Any, metric: str, points: int = 8, *, spacing: str = "log",
                  cost_models: Sequence[CostModel] = (), signal: str = "auto", time_limit: float = 60.0,
                  tie: Sequence[str] = ()) -> Frontier:
    """Solve ``points`` budgets of ``metric``, ``spacing`` as :func:`sweep_budgets` spaces them, and keep,
    per budget, the plan with its planned and uniform allocation and their predictions.

    ``cost_models``, ``signal``, ``time_limit`` and ``tie`` are :func:`make_plan`'s. Each point records its
    ``budget`` (``absolute``, in the metric's unit, and ``fraction`` of the original), the planned
    allocation's ``predicted`` drop and costs and, where a uniform allocation meets the budget, the
    uniform one's (with ``on_grid``: whether the planner could have chosen it, i.e. every fraction
    it prunes was scanned; only then is the planned prediction never worse by construction). A drop
    is positive when the model gets worse. Example:
    ``make_frontier(Scan.load("scan.json"), "size", 8).save("frontier/")``.
    """
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise UserInputError(f"The 'points' parameter must be an integer >= 2 (a frontier needs two budgets). "
                             f"Got {points!r} instead.")
    t0 = time.perf_counter()
    cm = Costs(scan, cost_models, signal, tie)
    if metric not in cm.metrics:
        raise UserInputError(f"The metric {metric!r} is not known. Use one of {', '.join(cm.metrics)} (a measured "
                             f"metric needs its cost table).")
    original = cm.original[metric]
    cheapest = min_cost(cm, metric, time_limit).costs[metric]
    if original - cheapest <= 1e-9 * abs(original):
        lower = [m for m in cm.metrics if m != metric and min_cost(cm, m, time_limit).costs[m] < cm.original[m]]
        raise UserInputError(f"No scanned setting lowers {metric}: the cheapest plan costs what the original does "
                             f"({original:.6g}), so there is nothing to sweep. Sweep another --metric"
                             + (f" ({', '.join(lower)} can be lowered)" if lower else "")
                             + f", or scan methods that lower {metric}.")
    budgets = sweep_budgets(cheapest, original, points, spacing)
    if budgets[0] <= 0:  # a budget is positive (a cost table's cheapest plan may cost nothing)
        budgets[0] = budgets[1] / 2
    keys = {b.name: {o.key for o in b.options} for b in cm.blocks}
    plans, rows = [], []
    for i, value in enumerate(budgets):
        plan = make_plan(scan, [Budget(metric, value, relative=False)], time_limit=time_limit,
                         cost_models=cost_models, signal=signal, tie=tie)
        plans.append(plan)
        rows.append(_point(i, plan, keys))
    units: dict[str, str] = {}
    for d in cm.describe():
        units.update(d.get("units") or {m: d.get("unit", "") for m in d.get("metrics", [])})
    data = {
        "format": FRONTIER_FORMAT,
        "schema_version": FRONTIER_SCHEMA_VERSION,
        "created": now_iso(),
        "versions": versions(),
        "scan": {"path": scan.path or None, "sha256": scan.sha256 or None, "baseline": dict(scan.baseline)},
        "model": dict(scan.data["model"]),
        "task": dict(scan.data["task"]),
        "metric": metric,
        "unit": units.get(metric, ""),
        "signal": cm.signal,
        "cost_models": cm.describe(),
        "original": dict(cm.original),
        "cheapest": cheapest,
        "spacing": spacing,
        "spacing_rule": SPACINGS[spacing],
        "points": rows,
        "measurement": None,
        "seconds": {"solve": round(time.perf_counter() - t0, 3)},
    }
    return Frontier(data, tuple(plans))


def _point(index: int, plan: Plan, keys: Mapping[str, set[str]]) -> dict[str, Any]:
    budget = plan.data["objective"]["budgets"][0]
    out: dict[str, Any] = {"index": index, "budget": {"absolute": budget["absolute"], "fraction": budget["fraction"]},
                           "plan": None,
                           "planned": {"predicted": dict(plan.variant("planned")["predicted"]), "measured": None},
                           "uniform": None}
    uni = plan.data["plans"].get("uniform")
    if uni is not None:
        on_grid = all(option_key(c["method"], c["setting"]) in keys.get(name, set())
                      for name, c in uni["choices"].items() if c.get("method"))
        out["uniform"] = {"label": uni["uniform"]["label"], "on_grid": on_grid,
                          "predicted": dict(uni["predicted"]), "measured": None}
    return out


# -- measuring ------------------------------------------------------------------------------------
def _measurement_split(verifier: Verifier) -> tuple[EvalSet, str, str]:
    """The data to measure the points on, its name (``held-out`` or ``scan sample``) and what it
    is in words: every held-out item of ``verifier`` (both halves of its split: no point's plan was
    chosen on any of them), else the scan's sample (in-sample, said so)."""
    import numpy as np
    import torch

    from sensplan.sensitivity import EvalSet

    parts = [d for d in (verifier.held, verifier.report) if d is not None]
    if not parts:
        return verifier.data, "scan sample", (f"the scan's sample ({len(verifier.data)} items; in-sample: every "
                                              f"point's plan was chosen on it, and the scan's data has nothing "
                                              f"else: pass --holdout-data SPEC)")
    first = parts[0]
    if len(parts) == 1:
        ds = first
    else:
        idx = [p.indices for p in parts]
        ds = EvalSet(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), first.classes,
                     {**first.description, "n": sum(len(p) for p in parts), "role": "held-out"},
                     None if any(i is None for i in idx) else np.concatenate(cast(list[Any], idx)))
    spec = first.description.get("spec", "the scan's data")
    return ds, "held-out", (f"{len(ds)} held-out items of {spec} outside the scan's sample and calibration "
                            f"(out of sample: no point's plan was chosen on them)")


class _Recorded:
    """The task, evaluating on the verifier's device and precision, and keeping its last result:
    :func:`~sensplan.planner.measure` returns the score alone, the paired standard error needs the
    per-sample scores."""

    def __init__(self, task: Task, device: Any, dtype: Any) -> None:
        self.task, self.device, self.dtype = task, device, dtype
        self.result: TaskResult | None = None

    def evaluate(self, model: Any, data: EvalSet, state: Any, batch_size: int = 500, device: Any = None,
                 dtype: Any = None) -> TaskResult:
        self.result = self.task.evaluate(model, data, state, batch_size, self.device, self.dtype)
        return self.result


def measure_frontier(frontier: Frontier, verifier: Verifier, indices: Sequence[int], *,
                     progress: Callable[[str], None] | None = None) -> Frontier:
    """Apply the planned and the uniform allocation of the points ``indices`` to ``verifier``'s
    model as the executor does without fine-tuning (BatchNorm recalibrated on the scan's
    calibration data) and measure each on every held-out item of ``verifier`` (both halves of its
    split; without any, on the scan's sample, said so in ``measurement.measured_on``): ``score``, ``drop``
    (from the original's score on the same items; positive = worse), its paired standard error
    ``drop_se``, ``n``, and the costs ``size`` (bytes of tensor data in the compressed file),
    ``macs``, ``bops``, ``params`` and ``bits`` (as ``sensplan apply`` measures them; a cost table's
    metric is not measured). An allocation two points share is measured once. Returns a new
    frontier; ``frontier`` is not modified."""
    from sensplan.planner._apply import compress, layer_effects, measure, scope_bits
    from sensplan.planner._compressed import payload_size, save_compressed
    from sensplan.sensitivity import batchnorm_statistics, get_task
    from sensplan.sensitivity.tasks import paired_se

    n_points = len(frontier.data["points"])
    bad = [i for i in indices if not 0 <= i < n_points]
    if bad or len(frontier.plans) != n_points:
        raise UserInputError(f"Measure points 0 to {n_points - 1} of a frontier made by make_frontier. Got {bad}.")
    t0 = time.perf_counter()
    say = progress or (lambda _: None)
    ds, split, measured_on = _measurement_split(verifier)
    task = get_task(frontier.data["task"]["name"], named_in="The frontier")
    metric = Metric.from_dict(frontier.data["task"]["metric"])
    model, bs, dev, dtype = verifier.model, verifier.batch_size, verifier.device, verifier.dtype
    state = task.prepare(model, ds, bs, dev, dtype)
    base = task.evaluate(model, ds, state, bs, dev, dtype)
    reference = batchnorm_statistics(model, verifier.calib) if verifier.calib is not None else {}
    names = {n for n, _ in model.named_modules()}

    def one(plan: Plan, variant: str) -> dict[str, Any]:
        alloc = plan.variant(variant)
        cmod, _ = compress(model, plan, variant, verifier.data.example_input, calib=verifier.calib,
                           data=verifier.data, model_spec=verifier.model_spec, bn_reference=reference)
        with tempfile.TemporaryDirectory(prefix="sensplan-frontier-") as tmp:
            path = Path(tmp) / "model.sensplan"
            file_bytes = save_compressed(cmod, path)
            size, bits = payload_size(path), scope_bits(path, plan.data.get("scope") or {})
        seen = _Recorded(task, dev, dtype)
        m = measure(cmod.module, ds, file_bytes, task=cast("Task", seen), task_state=state,
                    effects=layer_effects(alloc), batch_size=bs, timing=False, original=names)
        ev = seen.result
        se = (paired_se(base.per_sample, ev.per_sample)[2]
              if ev is not None and base.per_sample is not None and ev.per_sample is not None else 0.0)
        return {"score": m["score"], "drop": metric.drop(base.score, m["score"]), "drop_se": se, "n": m["n"],
                "size": size, "macs": m["macs"], "bops": m["bops"], "params": m["params"], "bits": bits}

    memo: dict[str, dict[str, Any]] = {}
    points = [dict(p) for p in frontier.data["points"]]
    for i in sorted(set(indices)):
        plan = frontier.plans[i]
        for variant in VARIANTS:
            entry = points[i].get(variant)
            if entry is None:
                continue
            choices = plan.variant(variant)["choices"]
            key = json.dumps({n: [c.get("method"), c.get("setting")] for n, c in choices.items()}, sort_keys=True)
            if key not in memo:
                b = points[i]["budget"]
                say(f"measuring point {i} ({frontier.metric} budget "
                    + (f"{b['fraction']:.3f} of the original" if b["fraction"] is not None else f"{b['absolute']:.6g}")
                    + f"), {variant}")
                memo[key] = one(plan, variant)
            points[i][variant] = {**entry, "measured": memo[key]}
    data = {**frontier.data, "points": points,
            "measurement": {"measured_on": measured_on, "split": split, "n": len(ds),
                            "baseline": {"score": base.score, "n": base.n}, "points": sorted(set(indices)),
                            "allocations": len(memo),
                            "how": "applied as the executor applies it without fine-tuning (BatchNorm recalibrated "
                                   "on the scan's calibration data), measured in memory; size and bits from the "
                                   "compressed file"},
            "seconds": {**frontier.data.get("seconds", {}), "measure": round(time.perf_counter() - t0, 3)}}
    return Frontier(data, frontier.plans, frontier.path)


# -- the figure -----------------------------------------------------------------------------------
def plot_frontier(data: Mapping[str, Any]) -> bytes:
    """``frontier.png`` (PNG bytes) from a frontier's data: the task's drop (percentage points for
    a fraction metric; positive = worse) against the cost as a fraction of the original, the
    planned (blue) and the uniform allocation (orange) side by side; predicted as lines with open
    markers, measured as filled diamonds with their 95% interval (± 1.96 paired standard errors)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    metric, original = str(data["metric"]), float(data["original"][data["metric"]] or 0.0)
    task_metric = Metric.from_dict(data["task"]["metric"])
    factor, unit = (100.0, "points") if task_metric.unit == "fraction" else (1.0, task_metric.unit or "score units")

    def x(costs: Mapping[str, Any]) -> float:
        v = costs.get(metric)
        return float("nan") if v is None else float(v) / original if original else float(v)

    fig = Figure(figsize=(7.0, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {"planned": ("tab:blue", "o"), "uniform": ("tab:orange", "s")}
    for variant in VARIANTS:
        color, marker = styles[variant]
        entries = [p[variant] for p in data["points"] if p.get(variant)]
        if entries:
            ax.plot([x(e["predicted"]) for e in entries], [factor * float(e["predicted"]["drop"]) for e in entries],
                    marker=marker, color=color, mfc="white", lw=1.2, label=f"{variant}, predicted")
        # a cost table's metric is not measured: the measured drop then sits at the predicted cost
        measured = [(e["measured"], e["measured"] if e["measured"].get(metric) is not None else e["predicted"])
                    for e in entries if e.get("measured")]
        if measured:
            ax.errorbar([x(c) for _, c in measured], [factor * float(m["drop"]) for m, _ in measured],
                        yerr=[factor * Z95 * float(m.get("drop_se") or 0.0) for m, _ in measured],
                        fmt="D", color=color, ms=6, capsize=3, label=f"{variant}, measured")
    ax.axhline(0.0, color="grey", lw=0.6)
    if data.get("spacing") == "log" and original > 0 and float(data.get("cheapest") or 0.0) > 0:
        ax.set_xscale("log")  # the budgets are evenly spaced there
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(f"{metric}, fraction of the original" if original else metric)
    ax.set_ylabel(f"{task_metric.name} drop ({unit}; positive = worse)")
    ms = data.get("measurement") or {}
    ax.set_title(f"Pareto frontier: {task_metric.name} drop against {metric}"
                 + (f"\nmeasured on {ms.get('n')} {ms.get('split')} items" if ms else "\n(predicted only)"),
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()

