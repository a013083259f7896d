"""The exact allocation: a multiple-choice knapsack with coupled costs, solved as a MILP (HiGHS).

One option per block (a pruning ratio per group, bits per layer). The drop is additive over blocks
(the scan's per-unit envelope drops). Costs are sums of terms over a few blocks each (see
``_costs``). A term over several blocks uses continuous variables ``z`` over the product of their
options, constrained so that their marginals equal the blocks' binary choice variables; with binary
choices this forces ``z`` to the indicator of the chosen combination, so the linearisation is exact
and its LP relaxation tight.

Two modes:
- ``budget``: minimise the predicted drop subject to every budget;
- ``max_drop``: minimise one metric's cost subject to the predicted drop <= max_drop (and budgets).

:func:`brute_force` enumerates every choice (small instances) and exists to check the MILP.
:func:`uniform_choice` gives the same-ratio-everywhere / same-bits-everywhere baseline.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from sensplan._effects import n_remove_for
from sensplan._errors import InfeasibleBudgetError, InternalError
from sensplan.planner._budget import Budget
from sensplan.planner._costs import Costs, merged_effects

# Among plans of equal predicted top-1 drop, prefer the one with the smaller loss increase: on a
# few thousand samples many settings tie at a drop of exactly 0, while the loss still tells them
# apart. The weight keeps the tie-break below one sample's worth of accuracy in practice.
LOSS_TIEBREAK = 1e-4


def objective_table(cm: Costs, tiebreak: bool = True) -> list[np.ndarray]:
    """Per block, the objective of each option: the envelope drop (+ the loss tie-break), or the
    envelope of the planning signal (continuous: no ties to break)."""
    drops = cm.drop_table("drop")
    if not tiebreak or not cm.drop_map.identity:
        return drops
    losses = cm.drop_table("loss_increase")
    return [d + LOSS_TIEBREAK * lo for d, lo in zip(drops, losses, strict=True)]


def _polish(cm: Costs, choice: dict[int, int], lim: Mapping[str, float]) -> dict[int, int]:
    """Move each block to its mildest option that keeps every budget.

    Envelope drops never rise as compression falls, so this never makes the plan worse; it undoes
    compression that buys nothing (e.g. bits chosen among zero-drop ties under a MACs budget).
    """
    out = dict(choice)
    objective = objective_table(cm)
    for bi in range(len(cm.blocks)):
        for o in range(out[bi]):
            # a lower index is milder only within one method: never trade up in objective (e.g. a
            # block's fp16 option for its int8 option, which comes first but drops more)
            if objective[bi][o] > objective[bi][out[bi]]:
                continue
            trial = {**out, bi: o}
            if not cm.feasible(trial):
                continue
            costs = cm.evaluate(trial)
            if all(costs[m] <= v + _relative_slack(v) for m, v in lim.items()):
                out = trial
                break
    return out


@dataclass(frozen=True)
class Solution:
    """A choice (block index -> option index) with its predicted drop and costs."""

    choice: dict[int, int]
    predicted_drop: float
    costs: dict[str, float]
    status: str = "optimal"
    gap: float = 0.0

    @property
    def optimal(self) -> bool:
        return self.status == "optimal"


@dataclass(frozen=True)
class CountPenalty:
    """A drop that the additive model misses, learned by measuring: when ``k`` blocks choose the
    option ``key`` (e.g. 2-bit weights), it adds ``rate * k * (k - 1) / 2``, one ``rate`` per pair of
    them (errors that compound). Convex in ``k``, so the MILP prices it exactly with one continuous
    variable and ``k - 1`` tangent constraints."""

    key: str
    rate: float

    def count(self, cm: Costs, choice: Mapping[int, int]) -> int:
        return sum(1 for i, b in enumerate(cm.blocks) if b.options[choice.get(i, 0)].key == self.key)

    def value(self, k: int) -> float:
        return self.rate * k * (k - 1) / 2


def penalty(cm: Costs, choice: Mapping[int, int], penalties: Sequence[CountPenalty]) -> float:
    """The learned penalties' total for ``choice``."""
    return float(sum(p.value(p.count(cm, choice)) for p in penalties))


def _fmt(metric: str, v: float) -> str:
    if metric == "size":
        return f"{v / 1e6:.4g} MB"
    if metric in ("macs", "bops", "params"):
        return f"{v / 1e6:.4g} M"
    return f"{v:.4g}"


class _Problem:
    def __init__(self, cm: Costs) -> None:
        self.cm = cm
        self.offset: list[int] = []
        n = 0
        for b in cm.blocks:
            self.offset.append(n)
            n += len(b.options)
        self.n_x = n
        # one z-block per distinct multi-block factor tuple, shared by every metric
        self.zoff: dict[tuple[int, ...], int] = {}
        for metric_terms in cm.terms.values():
            for t in metric_terms:
                if len(t.factors) > 1 and t.factors not in self.zoff:
                    self.zoff[t.factors] = n
                    n += int(np.prod([len(cm.blocks[f].options) for f in t.factors]))
        self.n = n
        self.upper = np.ones(n)
        self.penalty_cols: list[int] = []
        self.penalty_rows: list[tuple[np.ndarray, float, float]] = []

    def add_penalties(self, penalties: Sequence[CountPenalty]) -> None:
        """One continuous variable per penalty, bounded below by the tangents of its convex value
        at every count (call before building any row)."""
        for pen in penalties:
            col = self.n
            self.n += 1
            self.upper = np.append(self.upper, np.inf)
            self.penalty_cols.append(col)
            members = [self.x(i, o) for i, b in enumerate(self.cm.blocks)
                       for o, opt in enumerate(b.options) if opt.key == pen.key]
            for m in range(1, len(members)):
                row = np.zeros(self.n)  # extended below to the final width
                row[members] = pen.rate * m
                row[col] = -1.0
                self.penalty_rows.append((row, -np.inf, pen.rate * m * (m + 1) / 2))

    def _widen(self, row: np.ndarray) -> np.ndarray:
        return row if len(row) == self.n else np.concatenate([row, np.zeros(self.n - len(row))])

    def x(self, block: int, option: int) -> int:
        return self.offset[block] + option

    def cost_row(self, metric: str) -> tuple[np.ndarray, float]:
        row = np.zeros(self.n)
        const = 0.0
        for t in self.cm.terms[metric]:
            if len(t.factors) == 0:
                const += float(t.table)
            elif len(t.factors) == 1:
                f = t.factors[0]
                row[self.offset[f]: self.offset[f] + len(t.table)] += t.table
            else:
                z0 = self.zoff[t.factors]
                row[z0: z0 + t.table.size] += t.table.reshape(-1)
        return row, const

    def structure(self) -> tuple[coo_matrix, np.ndarray, np.ndarray]:
        rows, cols, vals = [], [], []
        lo, hi = [], []
        r = 0
        for bi, b in enumerate(self.cm.blocks):  # one option per block
            for o in range(len(b.options)):
                rows.append(r)
                cols.append(self.x(bi, o))
                vals.append(1.0)
            lo.append(1.0)
            hi.append(1.0)
            r += 1
        for (i, ka), (j, kb) in self.cm.conflicts:  # options that cannot change one unit together
            rows.extend([r, r])
            cols.extend([self.x(i, ka), self.x(j, kb)])
            vals.extend([1.0, 1.0])
            lo.append(0.0)
            hi.append(1.0)
            r += 1
        for factors, z0 in self.zoff.items():  # marginals of z equal the block choices
            sizes = [len(self.cm.blocks[f].options) for f in factors]
            # combos[pos, flat]: the option of factor ``pos`` in the flat (C-order) combination
            combos = np.indices(sizes).reshape(len(sizes), -1)
            for pos, f in enumerate(factors):
                for o in range(sizes[pos]):
                    flats = np.flatnonzero(combos[pos] == o)
                    rows.extend([r] * len(flats))
                    cols.extend((z0 + flats).tolist())
                    vals.extend([1.0] * len(flats))
                    rows.append(r)
                    cols.append(self.x(f, o))
                    vals.append(-1.0)
                    lo.append(0.0)
                    hi.append(0.0)
                    r += 1
        return coo_matrix((vals, (rows, cols)), shape=(r, self.n)), np.array(lo), np.array(hi)

    def drop_row(self, tiebreak: bool) -> np.ndarray:
        row = np.zeros(self.n)
        for bi, vals in enumerate(objective_table(self.cm, tiebreak)):
            row[self.offset[bi]: self.offset[bi] + len(vals)] = vals
        row[self.penalty_cols] = 1.0
        return row

    def solve(self, objective: np.ndarray, extra: list[tuple[np.ndarray, float, float]],
              time_limit: float) -> dict[int, int] | None:
        a, lo, hi = self.structure()
        constraints = [LinearConstraint(a, lo, hi)]
        for row, low, high in [*extra, *self.penalty_rows]:
            constraints.append(LinearConstraint(self._widen(row).reshape(1, -1), low, high))
        integrality = np.zeros(self.n)
        integrality[: self.n_x] = 1
        res = milp(self._widen(objective), constraints=constraints, integrality=integrality,
                   bounds=Bounds(np.zeros(self.n), self.upper),
                   options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
        self.optimal = res.status == 0
        self.status = "optimal" if res.status == 0 else f"not proven optimal ({res.message})"
        self.gap = float(getattr(res, "mip_gap", 0.0) or 0.0)
        if res.x is None:
            if res.status == 2:  # infeasible
                return None
            raise InternalError(f"The MILP solver stopped without a solution: {res.message}")
        choice = {}
        for bi, b in enumerate(self.cm.blocks):
            vals = res.x[self.offset[bi]: self.offset[bi] + len(b.options)]
            choice[bi] = int(np.argmax(vals))
        return choice


def cost_metric(budgets: Sequence[Budget], minimize: str | None) -> str:
    """The cost that max-drop mode minimises: ``minimize``, else the first budget's metric."""
    return minimize or (budgets[0].metric if budgets else "macs")


def _limits(cm: Costs, budgets: Sequence[Budget]) -> dict[str, float]:
    lim: dict[str, float] = {}
    for b in budgets:
        v = b.limit(cm.original)
        lim[b.metric] = min(v, lim.get(b.metric, float("inf")))
    return lim


def _solution(cm: Costs, choice: dict[int, int]) -> Solution:
    return Solution(choice, cm.predicted_drop(choice), cm.evaluate(choice))


def _relative_slack(limit: float) -> float:
    # the cost rows are sums of floats; allow rounding at the last digits, never more
    return abs(limit) * 1e-9 + 1e-6


def min_cost(cm: Costs, metric: str, time_limit: float = 60.0) -> Solution:
    """The cheapest reachable choice for ``metric`` (ignoring accuracy)."""
    p = _Problem(cm)
    row, const = p.cost_row(metric)
    choice = p.solve(row, [], time_limit)
    if choice is None:  # pragma: no cover - "one option per block" is always feasible
        raise InternalError("no choice satisfies one option per block")
    return _solution(cm, choice)


def solve(cm: Costs, budgets: Sequence[Budget], *, max_drop: float | None = None,
          minimize: str | None = None, time_limit: float = 60.0,
          penalties: Sequence[CountPenalty] = ()) -> Solution:
    """The optimal choice: least predicted drop within ``budgets``; or, with ``max_drop``, the least
    ``minimize`` cost whose predicted drop is at most ``max_drop`` (and within ``budgets``). The
    predicted drop includes the learned ``penalties`` (see :class:`CountPenalty`).

    Raises :class:`InfeasibleBudgetError` stating the smallest reachable cost.
    """
    p = _Problem(cm)
    p.add_penalties(penalties)
    lim = _limits(cm, budgets)
    extra = []
    for metric, v in lim.items():
        row, const = p.cost_row(metric)
        extra.append((row, -np.inf, v - const + _relative_slack(v)))
    if max_drop is not None:
        metric = cost_metric(budgets, minimize)
        row, const = p.cost_row(metric)
        scale = cm.original[metric] or 1.0
        objective = row / scale + 1e-6 * p.drop_row(tiebreak=False)
        extra.append((p.drop_row(tiebreak=False), -np.inf, cm.objective_of(max_drop) + 1e-12))
    else:
        objective = p.drop_row(tiebreak=True)
    choice = p.solve(objective, extra, time_limit)
    if choice is None:
        if max_drop is not None:  # the budgets alone may be reachable: then the max-drop is the cause
            least = solve(cm, budgets, time_limit=time_limit, penalties=penalties).predicted_drop
            raise InfeasibleBudgetError(
                f"No plan within the budget keeps the predicted drop within the max-drop "
                f"{max_drop:g}: the least predicted drop within the budget is {least:.4g}. Raise "
                f"--max-drop or the budget.")
        raise _infeasible(cm, lim)
    if max_drop is None and not penalties:  # polishing could trade one penalised option for another
        choice = _polish(cm, choice, lim)
    sol = _solution(cm, choice)
    drop = cm.predicted_drop(choice, penalty(cm, choice, penalties))
    return Solution(sol.choice, drop, sol.costs, p.status, p.gap)


def _infeasible(cm: Costs, lim: Mapping[str, float]) -> InfeasibleBudgetError:
    parts = []
    for metric, v in lim.items():
        best = min_cost(cm, metric).costs[metric]
        orig = cm.original[metric]
        parts.append(f"{metric} budget {_fmt(metric, v)} ({v / orig:.3f} of the original) is below the smallest "
                     f"reachable {metric}: {_fmt(metric, best)} ({best / orig:.3f} of the original)"
                     if best > v * (1 + 1e-9) else
                     f"{metric} budget {_fmt(metric, v)} ({v / orig:.3f}) is reachable alone")
    return InfeasibleBudgetError(
        "No plan meets the budget with the scanned settings: " + "; ".join(parts) +
        ". Raise the budget, or scan stronger settings or more methods (sensplan scan --ratios, --bits, "
        "--methods).")


def brute_force(cm: Costs, budgets: Sequence[Budget], *, max_drop: float | None = None,
                minimize: str | None = None, penalties: Sequence[CountPenalty] = ()) -> Solution | None:
    """Enumerate every choice; the reference the MILP is tested against (small instances only)."""
    lim = _limits(cm, budgets)
    drops = cm.drop_table("drop")
    objective = objective_table(cm)
    best: tuple[float, dict[int, int]] | None = None
    metric = cost_metric(budgets, minimize)
    for combo in itertools.product(*[range(len(b.options)) for b in cm.blocks]):
        choice = dict(enumerate(combo))
        if not cm.feasible(choice):
            continue
        costs = cm.evaluate(choice)
        if any(costs[m] > v + _relative_slack(v) for m, v in lim.items()):
            continue
        extra = penalty(cm, choice, penalties)
        drop = cm.drop_of(float(sum(drops[i][o] for i, o in choice.items())) + extra)
        if max_drop is not None:
            if drop > max_drop + 1e-12:
                continue
            key = costs[metric] / (cm.original[metric] or 1.0) + 1e-6 * drop
        else:
            key = float(sum(objective[i][o] for i, o in choice.items())) + extra
        if best is None or key < best[0] - 1e-12:
            best = (key, choice)
    if best is None:
        return None
    sol = _solution(cm, best[1])
    return Solution(sol.choice, cm.predicted_drop(best[1], penalty(cm, best[1], penalties)), sol.costs)




@dataclass(frozen=True)
class UniformSolution:
    """The uniform baseline: one option per layer axis for every layer that has it (``layer_options``:
    axis -> option key), and one fraction ``ratio`` of channels removed from every scanned group
    (``removed`` channels per group)."""

    ratio: float
    layer_options: dict[str, str]
    removed: dict[str, int]
    choice: dict[int, int]
    predicted_drop: float
    costs: dict[str, float]


def uniform_label(cm: Costs, uni: UniformSolution) -> str:
    """A uniform candidate in words, with the methods' own labels: "prune 18%, int4"."""
    labels = {o.key: o.label for b in cm.blocks for o in b.options}
    group_methods = sorted({str(group_method(cm, i)) for i, b in enumerate(cm.blocks) if b.kind == "group"})
    parts = [f"{'/'.join(group_methods)} {uni.ratio:.0%}"] if uni.ratio else []
    parts += [labels.get(k, k) for k in uni.layer_options.values() if k != "none"]
    return ", ".join(parts) or "no compression"


def group_method(cm: Costs, block: int) -> str | None:
    """The method that removes a group block's channels (its first option's)."""
    return next((o.method for o in cm.blocks[block].options if o.method), None)


def interp_drop(cm: Costs, block: int, k: float) -> float:
    """The objective of group ``block`` with ``k`` channels removed (its drop, or its signal),
    interpolated linearly between its scanned settings (for off-grid uniform ratios)."""
    b = cm.blocks[block]
    removed = np.array([o.effect.get("removed", 0) for o in b.options], dtype=float)
    return float(np.interp(k, removed, cm.drop_table("drop")[block]))


def group_fraction(cm: Costs, block: int, option: int) -> float:
    """The fraction of a group's channels an option removes, as its method states it (the value of
    the method's ``setting_key``, e.g. prune's ``ratio``), else removed / channels."""
    b = cm.blocks[block]
    o = b.options[option]
    key = (cm.scan.methods.get(o.method) or {}).get("setting_key") if o.method else None
    value = o.setting.get(key) if key else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1:
        return float(value)
    return float(o.effect.get("removed", 0)) / max(1, b.channels)


def uniform_candidates(cm: Costs, budgets: Sequence[Budget], *, max_drop: float | None = None,
                       minimize: str | None = None, step: float = 0.01) -> list[UniformSolution]:
    """One uniform plan per combination of layer options (e.g. every layer at int4; or int8 and 50%
    sparse), each with the single fraction of channels removed from every group (on a fine grid up
    to the largest scanned fraction) that meets the budget with the least pruning. In max-drop mode,
    the most pruning whose predicted drop stays within ``max_drop``. Combinations that cannot meet
    the budget, or that pair options which cannot change one unit together, are left out.

    Off-grid fractions are costed exactly (analytic metrics; counts rounded per group as
    :func:`~sensplan._effects.n_remove_for` does) and their drops interpolated between the scanned
    ones; a measured cost table is used at the scanned options only.
    """
    lim = _limits(cm, budgets)
    groups = [i for i, b in enumerate(cm.blocks) if b.kind == "group"]
    ratios = _uniform_ratios(cm, groups, [m for m in [*lim, minimize] if m], step)
    out: list[UniformSolution] = []
    for layer_opts, choice in _uniform_layer_choices(cm):
        best = _uniform_ratio(cm, groups, ratios, layer_opts, choice, lim, max_drop, cost_metric(budgets, minimize))
        if best is not None:
            out.append(best)
    return out


def _uniform_ratios(cm: Costs, groups: Sequence[int], metrics: Sequence[str], step: float) -> list[float]:
    """The fractions a uniform candidate tries: the scanned ones where a measured cost table is
    budgeted (it is known at those only), else a fine grid up to the largest scanned one."""
    from sensplan.planner._costs import AnalyticCosts

    scanned = sorted({group_fraction(cm, i, o) for i in groups for o in range(1, len(cm.blocks[i].options))})
    if not groups:
        return [0.0]
    if any(m not in AnalyticCosts.metrics for m in metrics):
        return [0.0, *scanned]
    top = max(scanned, default=0.0)
    return [float(r) for r in np.round(np.arange(0.0, top + 1e-9, step), 6)]


def _uniform_layer_choices(cm: Costs) -> list[tuple[dict[str, str], dict[int, int]]]:
    """Every combination of one option key per layer axis, as a choice over the layer blocks
    (a layer without that option keeps none); combinations the planner could not choose are left out."""
    from sensplan.planner._costs import NONE

    by_axis: dict[str, list[int]] = {}
    for i, b in enumerate(cm.blocks):
        if b.kind == "layer":
            by_axis.setdefault(b.axis, []).append(i)
    axis_keys = {ax: [NONE] + sorted({o.key for i in bis for o in cm.blocks[i].options[1:]})
                 for ax, bis in by_axis.items()}
    out = []
    for combo in itertools.product(*axis_keys.values()):
        layer_opts = dict(zip(axis_keys, combo, strict=True))
        choice: dict[int, int] = {}
        for ax, key in layer_opts.items():
            for i in by_axis[ax]:
                keys = [o.key for o in cm.blocks[i].options]
                choice[i] = keys.index(key) if key in keys else 0
        if cm.feasible(choice):
            out.append((layer_opts, choice))
    return out


def _uniform_ratio(cm: Costs, groups: Sequence[int], ratios: Sequence[float], layer_opts: Mapping[str, str],
                   choice: Mapping[int, int], lim: Mapping[str, float], max_drop: float | None,
                   metric: str) -> UniformSolution | None:
    """With these layer options: the least pruning that meets the budget (budget mode), or the
    cheapest candidate within ``max_drop``."""
    drops = cm.drop_table("drop")
    layer_drop = float(sum(drops[i][o] for i, o in choice.items()))
    effects = merged_effects(cm.blocks, choice)
    best: UniformSolution | None = None
    for r in ratios:
        removed = {cm.blocks[i].unit: n_remove_for(r, cm.blocks[i].channels, cm.blocks[i].channel_step)
                   if r > 0 else 0 for i in groups}
        gchoice, costs = _uniform_costs(cm, groups, removed, choice, effects)
        if any(costs[m] > v + _relative_slack(v) for m, v in lim.items()):
            continue
        drop = cm.drop_of(layer_drop + sum(interp_drop(cm, i, removed[cm.blocks[i].unit]) for i in groups))
        sol = UniformSolution(float(r), {f"{ax}:uniform": k for ax, k in layer_opts.items()},
                              removed, gchoice, float(drop), costs)
        if max_drop is None:
            return sol  # larger ratios with these layer options only cost accuracy
        if drop <= max_drop + 1e-12 and (best is None or costs[metric] < best.costs[metric]):
            best = sol
    return best


def _uniform_costs(cm: Costs, groups: Sequence[int], removed: Mapping[str, int], choice: Mapping[int, int],
                   effects: Mapping[str, Mapping[str, Any]]) -> tuple[dict[int, int], dict[str, float]]:
    """The choice with each group at its scanned option for ``removed`` (where there is one), and
    the costs: from the terms when every count was scanned, else the analytic ones computed
    directly (a measured table's, from the terms, at the nearest scanned options)."""
    gchoice = dict(choice)
    exact = True
    for i in groups:
        rem = [o.effect.get("removed", 0) for o in cm.blocks[i].options]
        k = removed[cm.blocks[i].unit]
        if k in rem:
            gchoice[i] = rem.index(k)
        else:
            exact = False
    costs = cm.evaluate(gchoice)
    if not exact:
        costs.update(cm.analytic.direct(removed, effects))
    return gchoice, costs


def uniform_choice(cm: Costs, budgets: Sequence[Budget], *, max_drop: float | None = None,
                   minimize: str | None = None, step: float = 0.01) -> UniformSolution | None:
    """The uniform plan at the same budget: of :func:`uniform_candidates`, the one with the smallest
    predicted drop (budget mode) or the smallest ``minimize`` cost (max-drop mode); None if none."""
    cands = uniform_candidates(cm, budgets, max_drop=max_drop, minimize=minimize, step=step)
    if not cands:
        return None
    if max_drop is None:
        return min(cands, key=lambda c: (c.predicted_drop, c.costs.get(cost_metric(budgets, minimize), 0.0)))
    metric = cost_metric(budgets, minimize)
    return min(cands, key=lambda c: c.costs[metric])
