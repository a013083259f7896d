"""The exact allocation: a multiple-choice knapsack with coupled costs, solved as a MILP (HiGHS).

One option per block (a pruning ratio per group, bits per layer). The drop is additive over blocks
(the scan's per-unit envelope drops). Costs are sums of terms over a few blocks each (see
``_costs``). Options that another option of their block dominates are left out first
(:func:`undominated`). A term over two blocks uses continuous variables ``z`` over the product of
their options, constrained so that their marginals equal the blocks' binary choice variables; with
binary choices this forces ``z`` to the indicator of the chosen combination, so the linearisation is
exact and, for one term, its LP relaxation is the convex hull. A term over three or more blocks
would need the product of all their options; it is written as a tensor train instead
(:class:`_Chain`), exact too, with variables that grow with the sum of the options.

Two modes:
- ``budget``: minimise the predicted drop subject to every budget;
- ``max_drop``: minimise one metric's cost subject to the predicted drop <= max_drop (and budgets).

:func:`brute_force` enumerates every choice (small instances) and exists to check the MILP.
:func:`uniform_choice` gives the same-ratio-everywhere / same-bits-everywhere baseline.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from sensplan._effects import n_remove_for
from sensplan._errors import InfeasibleBudgetError, InternalError
from sensplan.planner._budget import Budget
from sensplan.planner._costs import Costs, merged_effects

_QUIET = threading.Lock()
_quiet_depth = 0
_quiet_saved = -1


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """HiGHS (1.12, in scipy) writes a stray debug line to the process's stdout now and then
    ("HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();"). Point file
    descriptor 1 at the null device while solves run (the first solve in redirects, the last out
    restores, so solves in several threads nest correctly; other threads' stdout is dropped meanwhile)."""
    global _quiet_depth, _quiet_saved
    with _QUIET:
        if _quiet_depth == 0:
            saved = -1
            try:
                flush = getattr(sys.stdout, "flush", None)
                if flush is not None:
                    flush()
                saved = os.dup(1)
                null = os.open(os.devnull, os.O_WRONLY)
                try:
                    os.dup2(null, 1)
                finally:
                    os.close(null)
            except (OSError, ValueError):  # no file descriptor 1 to keep clean (an embedding host)
                if saved >= 0:
                    os.close(saved)
                saved = -1
            _quiet_saved = saved
        _quiet_depth += 1
    try:
        yield
    finally:
        with _QUIET:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_saved >= 0:
                os.dup2(_quiet_saved, 1)
                os.close(_quiet_saved)
                _quiet_saved = -1


def _milp(*args: Any, **kwargs: Any) -> Any:
    with _quiet_stdout():
        return milp(*args, **kwargs)


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
    group_of = {i: group for group in cm.ties for i in group}
    for bi in range(len(cm.blocks)):
        for o in range(out[bi]):
            # a lower index is milder only within one method: never trade up in objective (e.g. a
            # block's fp16 option for its int8 option, which comes first but drops more)
            if objective[bi][o] > objective[bi][out[bi]]:
                continue
            trial = {**out, bi: o}
            key = cm.blocks[bi].options[o].key
            for j in group_of.get(bi, ()):  # a tied group moves together (to the same option)
                k = next((k for k, opt in enumerate(cm.blocks[j].options) if opt.key == key), None)
                if k is None or objective[j][k] > objective[j][out[j]]:
                    break
                trial[j] = k
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


#: a coupled term whose table has at most this many entries is linearised over the product of its
#: factors' options (exact, and its LP relaxation is the convex hull); a larger one as a tensor train
DENSE_MAX = 64
#: a chain starts with a z-block over its first two factors where their product is at most this
PAIR_MAX = 1024


@dataclass
class _Chain:
    """The coupled terms over one factor tuple, every metric at once, as a tensor train.

    The stacked table ``T[o1, ..., ok, m]`` (each metric divided by ``scale[m]``) equals
    ``G1[o1] @ G2[o2] @ ... @ Gk[ok]``, with cores ``Gj`` of shape ``(n_j, r_{j-1}, r_j)`` (``r_0 = 1``,
    ``r_k`` = the metrics), from exact truncated SVDs (ranks cut at singular values below 1e-12 of
    the largest, then checked against the table). The MILP carries the partial products: the state
    ``s_1 = Σ_o G1[o] x1[o]`` is linear in the first factor's choice, and for ``j >= 2`` continuous
    ``w[a, o] = s_{j-1}[a] · xj[o]`` with ``Σ_o w[a, o] = s_{j-1}[a]`` and
    ``lo[a] · xj[o] <= w[a, o] <= hi[a] · xj[o]`` (``lo``/``hi``: the state's exact range over all
    option combinations). With binary ``x`` only the chosen option's ``w`` is non-zero and it equals
    the state, so the product is exact; the variables grow with Σ r·n instead of Π n.
    """

    factors: tuple[int, ...]
    head: int  # the first core is over the product of the first ``head`` factors (a z-block if 2)
    cores: list[np.ndarray]
    lows: list[np.ndarray]  # per step j >= 2: the range of s_{j-1}
    highs: list[np.ndarray]
    offsets: list[int]  # per step j >= 2: the first w column (set by the problem)

    @staticmethod
    def build(factors: tuple[int, ...], head: int, table: np.ndarray) -> _Chain | None:
        """The train of ``table`` (shape (n1, ..., nk, metrics), the first ``head`` factors' axes
        merged into one); None where it is not exact."""
        shape = table.shape
        cores: list[np.ndarray] = []
        lows, highs = [], []
        rest = table.reshape(shape[0], -1)
        left = np.ones((1, 1))  # the partial products over every combination so far (rows) by state
        r = 1
        for j, n in enumerate(shape[:-1]):
            mat = rest.reshape(r * n, -1)
            if j == len(shape) - 2:
                core = mat
                rest = np.ones((1, 1))
            else:
                u, sv, vt = np.linalg.svd(mat, full_matrices=False)
                keep = max(1, int(np.sum(sv > sv[0] * 1e-12))) if sv.size and sv[0] > 0 else 1
                core = u[:, :keep]
                rest = sv[:keep, None] * vt[:keep]
            width = core.shape[1]
            core3 = core.reshape(r, n, width).transpose(1, 0, 2)  # (n, r_prev, r)
            if j > 0:
                lows.append(left.min(axis=0))
                highs.append(left.max(axis=0))
            # the states over every combination of the factors so far (C order)
            left = np.einsum("ca,nab->cnb", left, core3).reshape(-1, width)
            cores.append(core3)
            r = width
        # every metric within 1e-9 of its own largest entry (each is in units of its whole original
        # cost, so an entry below 1e-6 of it is priced to 1e-15 of the original)
        err = np.abs(left.reshape(shape) - table).reshape(-1, shape[-1]).max(axis=0, initial=0.0)
        size = np.abs(table).reshape(-1, shape[-1]).max(axis=0, initial=0.0)
        if not np.all(np.isfinite(err)) or np.any(err > 1e-9 * np.maximum(size, 1e-6)):
            return None
        return _Chain(factors, head, cores, lows, highs, [])


def undominated(cm: Costs, metrics: Sequence[str], objective: Sequence[np.ndarray],
                penalties: Sequence[CountPenalty] = ()) -> list[np.ndarray]:
    """Per block, the options that no other option of the block dominates (exact reduction).

    Option ``a`` dominates ``b`` when its objective is no larger, its cost in every priced metric is
    no larger whatever the other blocks choose (every entry of every term it is a factor of), it
    conflicts with nothing ``b`` does not, and it carries no learned penalty ``b`` does not: then
    any choice with ``b`` is matched or beaten by the same choice with ``a``. Equal options keep
    the first. A multiple-choice knapsack loses most of its options this way (weight formats that
    cost more and lose more than another), and the MILP only sees the rest."""
    per_block: list[list[np.ndarray]] = [[] for _ in cm.blocks]
    for metric in metrics:
        for t in cm.terms[metric]:
            table = np.asarray(t.table, dtype=float)
            for pos, f in enumerate(t.factors):
                per_block[f].append(np.moveaxis(table, pos, 0).reshape(table.shape[pos], -1))
    conflicts: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for one, other in cm.conflicts:
        conflicts.setdefault(one, set()).add(other)
        conflicts.setdefault(other, set()).add(one)
    penalised = {p.key for p in penalties}
    tied = {i for group in cm.ties for i in group}
    out = []
    for i, block in enumerate(cm.blocks):
        n = len(block.options)
        if i in tied:  # an option may be dominated in each tied block and still best for the group
            out.append(np.arange(n))
            continue
        obj = np.asarray(objective[i], dtype=float)
        costs = np.concatenate(per_block[i], axis=1) if per_block[i] else np.zeros((n, 0))
        keys = [o.key for o in block.options]
        dominated = np.zeros(n, dtype=bool)
        for a in range(n):
            # a is no worse than o in every respect, and better in one (or equal and first); exact
            # comparisons, so the relation is a strict order and some option always survives
            le = (obj[a] <= obj) & np.all(costs[a] <= costs, axis=1)
            better = (obj[a] < obj) | np.any(costs[a] < costs, axis=1) | (np.arange(n) > a)
            for o in np.flatnonzero(le & better & ~dominated):
                if o != a and conflicts.get((i, a), set()) <= conflicts.get((i, int(o)), set()) and (
                        keys[a] not in penalised or keys[a] == keys[o]):
                    dominated[o] = True
        out.append(np.flatnonzero(~dominated))
    return out


class _Problem:
    """The MILP's variables and rows: a binary per kept (block, option) (``keep``: by default every
    option); per coupled factor tuple either continuous ``z`` over the product of its options (small
    tables) or a :class:`_Chain`; one continuous variable per learned penalty. :data:`DENSE_MAX` sets
    which (0: every coupled term over three or more blocks as a chain; the tests solve both ways)."""

    def __init__(self, cm: Costs, metrics: Sequence[str] | None = None,
                 keep: Sequence[np.ndarray] | None = None) -> None:
        self.cm = cm
        self.keep = [np.arange(len(b.options)) for b in cm.blocks] if keep is None else [np.asarray(k) for k in keep]
        self.sizes = [len(k) for k in self.keep]
        #: column of (block, original option index); -1 where the option was left out
        self.col: list[np.ndarray] = []
        self.offset: list[int] = []
        n = 0
        for b, k in zip(cm.blocks, self.keep, strict=True):
            self.offset.append(n)
            col = np.full(len(b.options), -1)
            col[k] = n + np.arange(len(k))
            self.col.append(col)
            n += len(k)
        self.n_x = n
        #: the metrics priced (those budgeted or minimised): the others' coupled terms are left out
        self.metrics = list(cm.terms) if metrics is None else [m for m in cm.terms if m in metrics]
        #: per metric, what one unit of a chain's output is worth (its tables are divided by it): the
        #: original cost, or the largest entry where that is 0
        self.scale = {m: abs(float(cm.original.get(m, 0.0))) or max(
            [float(np.abs(t.table).max(initial=0.0)) for t in cm.terms[m]] + [0.0]) or 1.0 for m in self.metrics}
        #: per metric, its terms restricted to the kept options
        self.terms: dict[str, list[tuple[tuple[int, ...], np.ndarray]]] = {
            m: [(t.factors, np.asarray(t.table, dtype=float)[np.ix_(*[self.keep[f] for f in t.factors])]
                 if t.factors else np.asarray(t.table, dtype=float)) for t in cm.terms[m]]
            for m in self.metrics}
        stacked: dict[tuple[int, ...], dict[str, np.ndarray]] = {}
        for metric in self.metrics:
            for factors, table in self.terms[metric]:
                if len(factors) > 1:
                    per = stacked.setdefault(factors, {})
                    per[metric] = per.get(metric, 0.0) + table
        # one z-block or chain per distinct multi-block factor tuple, shared by every metric
        self.zoff: dict[tuple[int, ...], int] = {}
        self.chains: dict[tuple[int, ...], _Chain] = {}
        lower: list[float] = [0.0] * n
        upper: list[float] = [1.0] * n
        for factors, per in stacked.items():
            size = int(np.prod([self.sizes[f] for f in factors]))
            chain = None
            if size > DENSE_MAX and len(factors) > 2:
                shape = next(iter(per.values())).shape
                table = np.stack([per.get(m, np.zeros(shape)) / self.scale[m] for m in self.metrics], axis=-1)
                chain = self._chain(factors, table)
            if chain is None:
                n = self._dense(factors, n, lower, upper)
                continue
            if chain.head > 1 and chain.factors[:chain.head] not in self.zoff:
                n = self._dense(chain.factors[:chain.head], n, lower, upper)
            for j, core in enumerate(chain.cores[1:]):
                chain.offsets.append(n)
                n += core.shape[0] * core.shape[1]  # w[a, o] at offset + a * n_j + o
                lower += np.repeat(np.minimum(chain.lows[j], 0.0), core.shape[0]).tolist()
                upper += np.repeat(np.maximum(chain.highs[j], 0.0), core.shape[0]).tolist()
            self.chains[factors] = chain
        self.n = n
        self.lower = np.array(lower)
        self.upper = np.array(upper)
        self.penalty_cols: list[int] = []
        self.penalty_rows: list[tuple[np.ndarray, float, float]] = []

    def _dense(self, factors: tuple[int, ...], n: int, lower: list[float], upper: list[float]) -> int:
        """A z-block over the product of ``factors``' options from column ``n``; the next free one."""
        size = int(np.prod([self.sizes[f] for f in factors]))
        self.zoff[factors] = n
        lower += [0.0] * size
        upper += [1.0] * size
        return n + size

    def _chain(self, factors: tuple[int, ...], table: np.ndarray) -> _Chain | None:
        """The chain of a coupled table over ``factors`` (axes in that order, metrics last).

        The layer's own blocks come first, then the channel groups, each by falling option count:
        the products are exact whenever the later factors' choices are integral, and a group (few
        options, shared by several layers) is what the solver branches on. The first two factors
        are one z-block (their exact hull) where their product is small."""
        blocks = self.cm.blocks
        order = sorted(range(len(factors)), key=lambda i: (blocks[factors[i]].kind == "group",
                                                           -self.sizes[factors[i]], factors[i]))
        head = 2 if np.prod([self.sizes[factors[i]] for i in order[:2]]) <= PAIR_MAX else 1
        if head == 2 and factors[order[0]] > factors[order[1]]:
            order[0], order[1] = order[1], order[0]  # a z-block's factors are sorted
        table = np.transpose(table, [*order, len(factors)])
        table = table.reshape(int(np.prod(table.shape[:head])), *table.shape[head:])
        return _Chain.build(tuple(factors[i] for i in order), head, table)

    def add_penalties(self, penalties: Sequence[CountPenalty]) -> None:
        """One continuous variable per penalty, bounded below by the tangents of its convex value
        at every count (call before building any row)."""
        for pen in penalties:
            col = self.n
            self.n += 1
            self.lower = np.append(self.lower, 0.0)
            self.upper = np.append(self.upper, np.inf)
            self.penalty_cols.append(col)
            members = [int(self.col[i][o]) for i, b in enumerate(self.cm.blocks)
                       for o, opt in enumerate(b.options) if opt.key == pen.key and self.col[i][o] >= 0]
            for m in range(1, len(members)):
                row = np.zeros(self.n)  # extended below to the final width
                row[members] = pen.rate * m
                row[col] = -1.0
                self.penalty_rows.append((row, -np.inf, pen.rate * m * (m + 1) / 2))

    def _widen(self, row: np.ndarray) -> np.ndarray:
        return row if len(row) == self.n else np.concatenate([row, np.zeros(self.n - len(row))])

    def cost_row(self, metric: str) -> tuple[np.ndarray, float]:
        row = np.zeros(self.n)
        const = 0.0
        for factors, table in self.terms[metric]:
            if len(factors) == 0:
                const += float(table)
            elif len(factors) == 1:
                f = factors[0]
                row[self.offset[f]: self.offset[f] + self.sizes[f]] += table
            elif factors not in self.chains:  # a dense z-block
                z0 = self.zoff[factors]
                row[z0: z0 + table.size] += table.reshape(-1)
        m = self.metrics.index(metric)
        for chain in self.chains.values():  # the last core maps the last state to every metric
            last = chain.cores[-1]  # (n_k, r_{k-1}, metrics); w[a, o] at offset + a * n_k + o
            w0 = chain.offsets[-1]
            row[w0: w0 + last.shape[0] * last.shape[1]] += last[:, :, m].T.reshape(-1) * self.scale[metric]
        return row, const

    def structure(self) -> tuple[coo_matrix, np.ndarray, np.ndarray]:
        rows, cols, vals = [], [], []
        lo, hi = [], []
        r = 0
        for bi in range(len(self.cm.blocks)):  # one option per block
            for o in range(self.sizes[bi]):
                rows.append(r)
                cols.append(self.offset[bi] + o)
                vals.append(1.0)
            lo.append(1.0)
            hi.append(1.0)
            r += 1
        for (i, ka), (j, kb) in self.cm.conflicts:  # options that cannot change one unit together
            ca, cb = int(self.col[i][ka]), int(self.col[j][kb])
            if ca < 0 or cb < 0:
                continue
            rows.extend([r, r])
            cols.extend([ca, cb])
            vals.extend([1.0, 1.0])
            lo.append(0.0)
            hi.append(1.0)
            r += 1
        for group in self.cm.ties:  # tied blocks choose the same option (by key)
            first = group[0]
            keys = {o.key: k for k, o in enumerate(self.cm.blocks[first].options) if self.col[first][k] >= 0}
            for j in group[1:]:
                here = {o.key: k for k, o in enumerate(self.cm.blocks[j].options) if self.col[j][k] >= 0}
                for key in keys.keys() | here.keys():
                    # x[first, key] - x[j, key] = 0; an option the other block lacks is never chosen
                    for b, k, sign in ((first, keys.get(key), 1.0), (j, here.get(key), -1.0)):
                        if k is not None:
                            rows.append(r)
                            cols.append(int(self.col[b][k]))
                            vals.append(sign)
                    lo.append(0.0)
                    hi.append(0.0)
                    r += 1
        for factors, z0 in self.zoff.items():  # marginals of z equal the block choices
            sizes = [self.sizes[f] for f in factors]
            # combos[pos, flat]: the option of factor ``pos`` in the flat (C-order) combination
            combos = np.indices(sizes).reshape(len(sizes), -1)
            for pos, f in enumerate(factors):
                for o in range(sizes[pos]):
                    flats = np.flatnonzero(combos[pos] == o)
                    rows.extend([r] * len(flats))
                    cols.extend((z0 + flats).tolist())
                    vals.extend([1.0] * len(flats))
                    rows.append(r)
                    cols.append(self.offset[f] + o)
                    vals.append(-1.0)
                    lo.append(0.0)
                    hi.append(0.0)
                    r += 1
        for chain in self.chains.values():
            r = self._chain_rows(chain, r, rows, cols, vals, lo, hi)
        return coo_matrix((vals, (rows, cols)), shape=(r, self.n)), np.array(lo), np.array(hi)

    def _chain_rows(self, chain: _Chain, r: int, rows: list[int], cols: list[int], vals: list[float],
                    lo: list[float], hi: list[float]) -> int:
        """A chain's rows (see :class:`_Chain`), from row ``r``; returns the next free row."""
        first = chain.cores[0]  # (n_1, 1, r_1)
        # the state entering step j: (columns, coefficients per state entry)
        start = self.offset[chain.factors[0]] if chain.head == 1 else self.zoff[chain.factors[:chain.head]]
        state_cols = np.arange(first.shape[0]) + start
        state_coef = first[:, 0, :]  # (columns, r)
        for j, core in enumerate(chain.cores[1:]):
            f = chain.factors[chain.head + j]
            n_j, r_prev = core.shape[0], core.shape[1]
            w0 = chain.offsets[j]
            xs = self.offset[f] + np.arange(n_j)
            for a in range(r_prev):
                # Σ_o w[a, o] - s[a] = 0
                ws = w0 + a * n_j + np.arange(n_j)
                keep = state_coef[:, a] != 0
                rows.extend([r] * (n_j + int(keep.sum())))
                cols.extend(ws.tolist() + state_cols[keep].tolist())
                vals.extend([1.0] * n_j + (-state_coef[keep, a]).tolist())
                lo.append(0.0)
                hi.append(0.0)
                r += 1
                low, high = float(chain.lows[j][a]), float(chain.highs[j][a])
                for o in range(n_j):  # low * x[o] <= w[a, o] <= high * x[o]
                    for bound, is_low in ((low, True), (high, False)):
                        rows.extend([r, r])
                        cols.extend([int(ws[o]), int(xs[o])])
                        vals.extend([1.0, -bound])
                        lo.append(0.0 if is_low else -np.inf)
                        hi.append(np.inf if is_low else 0.0)
                        r += 1
            # the next state: s'[b] = Σ_{a, o} core[o, a, b] w[a, o]
            state_cols = w0 + np.arange(r_prev * n_j)
            state_coef = core.transpose(1, 0, 2).reshape(r_prev * n_j, -1)
        return r

    def drop_row(self, tiebreak: bool) -> np.ndarray:
        row = np.zeros(self.n)
        for bi, vals in enumerate(objective_table(self.cm, tiebreak)):
            row[self.offset[bi]: self.offset[bi] + self.sizes[bi]] = vals[self.keep[bi]]
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
        cost = self._widen(objective)
        res = _milp(cost, constraints=constraints, integrality=integrality, bounds=Bounds(self.lower, self.upper),
                   options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
        self.optimal = res.status == 0
        self.status = "optimal" if res.status == 0 else f"not proven optimal ({res.message})"
        self.gap = float(getattr(res, "mip_gap", 0.0) or 0.0)
        x = res.x
        if res.status == 1:  # the time ran out: also round the relaxation, keep the better plan
            # and improve it, in at most min(time_limit, 30 s) more (at least 1 s)
            deadline = time.perf_counter() + min(max(time_limit, 1.0), 30.0)
            rounded = self._rounded(cost, constraints, integrality, deadline)
            if rounded is not None and (x is None or rounded[1] < float(res.fun) - 1e-12):
                x = rounded[0]
                self.status = ("not proven optimal (the time limit ran out; channel groups fixed at the "
                               "LP relaxation's choice, the rest solved)")
            if x is not None:
                x = self._improved(x, cost, constraints, integrality, deadline - time.perf_counter())
                best = float(cost @ x)
                bounds = [float(v) for v in (getattr(res, "mip_dual_bound", None), rounded[2] if rounded else None)
                          if v is not None and np.isfinite(v)]
                self.gap = float(max(0.0, best - max(bounds)) / max(abs(best), 1e-12)) if bounds else 1.0
        if x is None:
            if res.status == 2:  # infeasible
                return None
            raise InternalError(f"The MILP solver stopped without a solution: {res.message}")
        choice = {}
        for bi in range(len(self.cm.blocks)):
            vals = x[self.offset[bi]: self.offset[bi] + self.sizes[bi]]
            choice[bi] = int(self.keep[bi][int(np.argmax(vals))])
        return choice

    def _improved(self, x: np.ndarray, cost: np.ndarray, constraints: list[LinearConstraint],
                  integrality: np.ndarray, seconds: float) -> np.ndarray:
        """A plan at least as good as ``x``: windows of consecutive channel groups (a quarter of them,
        then an eighth, ...; with the groups tied to them) are freed in turn with every other group
        fixed at ``x``'s choice, and
        each small MILP is solved exactly (with most groups integral, its relaxation is tight), until
        ``seconds`` run out or a pass improves nothing."""
        groups = [bi for bi, b in enumerate(self.cm.blocks) if b.kind == "group" and self.sizes[bi] > 1]
        if not groups:
            return x
        deadline = time.perf_counter() + seconds
        width = max(1, len(groups) // 4)
        best = float(cost @ x)
        while width >= 1 and time.perf_counter() < deadline:
            improved = False
            for start in range(0, len(groups), max(1, width // 2)):
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                free = set(groups[start: start + width])
                for tied in self.cm.ties:  # a tied group is freed whole: one fixed member holds the rest
                    if free & set(tied):
                        free |= set(tied)
                lower, upper = self._fixed({bi: int(np.argmax(x[self.offset[bi]: self.offset[bi] + self.sizes[bi]]))
                                            for bi in groups if bi not in free})
                res = _milp(cost, constraints=constraints, integrality=integrality, bounds=Bounds(lower, upper),
                            options={"time_limit": min(left, max(1.0, seconds / 8)), "mip_rel_gap": 1e-9})
                if res.x is not None and float(res.fun) < best - 1e-12 * max(1.0, abs(best)):
                    x, best, improved = res.x, float(res.fun), True
            if not improved:
                width //= 2
        return x

    def _fixed(self, picks: Mapping[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The variable bounds with each block in ``picks`` fixed at that (kept) option."""
        lower, upper = self.lower.copy(), self.upper.copy()
        for bi, pick in picks.items():
            o0 = self.offset[bi]
            upper[o0: o0 + self.sizes[bi]] = 0.0
            lower[o0 + pick] = upper[o0 + pick] = 1.0
        return lower, upper

    def _rounded(self, cost: np.ndarray, constraints: list[LinearConstraint], integrality: np.ndarray,
                 deadline: float) -> tuple[np.ndarray, float, float] | None:
        """A solution found without the proof, with its objective and the LP relaxation's (a lower
        bound): each channel group fixed at its largest share in the LP relaxation, the rest solved
        exactly (with the groups integral, every chain is exact and its relaxation tight); where that
        is infeasible, each group at the most compressive option the relaxation uses (no cost that
        falls with compression is then above the relaxation's). None if neither finds a plan by
        ``deadline`` (each solve gets at least a second)."""
        relaxed = _milp(cost, constraints=constraints, bounds=Bounds(self.lower, self.upper),
                        options={"time_limit": max(1.0, deadline - time.perf_counter())})
        if relaxed.x is None:
            return None
        for most in (False, True):
            picks = {}
            for bi, b in enumerate(self.cm.blocks):
                if b.kind != "group":
                    continue
                share = relaxed.x[self.offset[bi]: self.offset[bi] + self.sizes[bi]]
                if most:  # the most channels removed among the options the relaxation uses
                    removed = [float(b.options[o].effect.get("removed", 0)) for o in self.keep[bi]]
                    used = np.flatnonzero(share > 1e-9)
                    picks[bi] = int(used[int(np.argmax([removed[u] for u in used]))]) if used.size else 0
                else:
                    picks[bi] = int(np.argmax(share))
            lower, upper = self._fixed(picks)
            res = _milp(cost, constraints=constraints, integrality=integrality, bounds=Bounds(lower, upper),
                        options={"time_limit": max(1.0, deadline - time.perf_counter()), "mip_rel_gap": 1e-9})
            if res.x is not None:
                return res.x, float(res.fun), float(relaxed.fun)
        return None


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
    p = _Problem(cm, [metric], keep=undominated(cm, [metric], objective_table(cm)))
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
    lim = _limits(cm, budgets)
    metrics = [*lim, *([cost_metric(budgets, minimize)] if max_drop is not None else [])]
    keep = undominated(cm, metrics, objective_table(cm, tiebreak=max_drop is None), penalties)
    p = _Problem(cm, metrics, keep=keep)
    p.add_penalties(penalties)
    tighter: dict[str, float] = {}
    for _ in range(3):
        choice = _solve_once(cm, p, lim, tighter, max_drop, minimize, budgets, time_limit)
        if choice is None:
            break
        # the chains are exact up to rounding: check the choice on the cost tables themselves
        costs = cm.evaluate(choice)
        over = {m: costs[m] - v for m, v in lim.items() if costs[m] > v + _relative_slack(v)}
        if not over:
            break
        for m, excess in over.items():
            tighter[m] = tighter.get(m, 0.0) + 2 * excess
    else:
        raise InternalError(f"The solver's plan exceeds the budget by {over} three times over; the MILP's "
                            f"cost rows do not match the cost tables.")
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


def _solve_once(cm: Costs, p: _Problem, lim: Mapping[str, float], tighter: Mapping[str, float],
                max_drop: float | None, minimize: str | None, budgets: Sequence[Budget],
                time_limit: float) -> dict[int, int] | None:
    """One MILP solve of :func:`solve`'s problem, each limit lowered by ``tighter``."""
    extra = []
    for metric, v in lim.items():
        row, const = p.cost_row(metric)
        scale = p.scale[metric]  # rows in units of the original cost: coefficients near 1
        extra.append((row / scale, -np.inf, (v - tighter.get(metric, 0.0) - const + _relative_slack(v)) / scale))
    if max_drop is not None:
        metric = cost_metric(budgets, minimize)
        row, const = p.cost_row(metric)
        scale = cm.original[metric] or 1.0
        objective = row / scale + 1e-6 * p.drop_row(tiebreak=False)
        extra.append((p.drop_row(tiebreak=False), -np.inf, cm.objective_of(max_drop) + 1e-12))
    else:
        objective = p.drop_row(tiebreak=True)
    return p.solve(objective, extra, time_limit)


def _infeasible(cm: Costs, lim: Mapping[str, float]) -> InfeasibleBudgetError:
    parts = []
    for metric, v in lim.items():
        best = min_cost(cm, metric).costs[metric]
        orig = cm.original[metric]

        def frac(x: float, orig: float = orig) -> str:  # a cost table may have 0 for the original
            return f" ({x / orig:.3f} of the original)" if orig else ""

        parts.append(f"{metric} budget {_fmt(metric, v)}{frac(v)} is below the smallest reachable {metric}: "
                     f"{_fmt(metric, best)}{frac(best)}"
                     if best > v * (1 + 1e-9) else
                     f"{metric} budget {_fmt(metric, v)}{frac(v)} is reachable alone")
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
        # the map without the ceiling, as the MILP's max-drop row (cm.objective_of) has it
        drop = cm.drop_map(float(sum(drops[i][o] for i, o in choice.items())) + extra)
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
    #: the total of the planning signal the drop was read off (a group between its scanned settings
    #: interpolated)
    signal_total: float = 0.0


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
        removed = {cm.blocks[i].unit: n_remove_for(r, cm.blocks[i].channels, cm.blocks[i].channel_step,
                                                   cm.blocks[i].round_to) if r > 0 else 0 for i in groups}
        gchoice, costs = _uniform_costs(cm, groups, removed, choice, effects)
        if any(costs[m] > v + _relative_slack(v) for m, v in lim.items()):
            continue
        total = layer_drop + sum(interp_drop(cm, i, removed[cm.blocks[i].unit]) for i in groups)
        sol = UniformSolution(float(r), {f"{ax}:uniform": k for ax, k in layer_opts.items()},
                              removed, gchoice, float(cm.drop_of(total)), costs, float(total))
        if max_drop is None:
            return sol  # larger ratios with these layer options only cost accuracy
        if sol.predicted_drop <= max_drop + 1e-12 and (best is None or costs[metric] < best.costs[metric]):
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
